-- DELETE /v1/users/{id} erases a user (a trial: a mistaken import could not be undone, and an
-- erasure request had no answer). Deleting the row already removed, through foreign keys, their
-- preferences, memberships, roles, sessions, digest items and runs, link clicks and feed state,
-- and through this trigger (0030) their in-app rows, deliveries (with their attempt logs) and
-- trace rows. It left the rows of the live feed that have no foreign key: the change log, the
-- rows waiting to be shown, and the stream marker. The trigger now removes those too; it runs as
-- its owner, as the application role may not delete them.
DROP TRIGGER users_delete_rows ON users;
CREATE TRIGGER users_delete_rows AFTER DELETE ON users
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION delete_referencing_rows(
        'user_id', 'notifications', 'deliveries', 'event_recipients', 'feed_changes', 'feed_due', 'feed_streams');
