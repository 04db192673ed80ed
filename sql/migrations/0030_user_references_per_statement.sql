-- The recipients of a fan-out's rows are checked once per statement, like their event since 0029
-- (issue 12). notifications, deliveries and event_recipients each had a foreign key to users,
-- checked row by row: a query and a lock of the user's row per inserted row, three per recipient.
-- On the scratch database of 0029 (10 000 recipients, in-app row + email delivery + trace row):
-- about 375 ms of the inserts' 1 380 ms were these three keys.
--
-- Each key is replaced by what it did, per statement, with 0029's functions: an insert looks up the
-- distinct users its rows name and locks them FOR KEY SHARE (a user already locked by the
-- transaction, as by the chunk's first insert, costs only the lookup), and a missing one is the
-- key's own error (SQLSTATE 23503, the old constraint's name); an update that moves a row to
-- another user is checked row by row; deleting users deletes their rows, as ON DELETE CASCADE did.
-- digest_items keeps its key (one row per digest decision, not per recipient).
ALTER TABLE notifications DROP CONSTRAINT notifications_user_id_fk;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_user_id_fk;
ALTER TABLE event_recipients DROP CONSTRAINT event_recipients_user_id_fk;

CREATE TRIGGER notifications_user_exists AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('users', 'user_id');
CREATE TRIGGER deliveries_user_exists AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('users', 'user_id');
CREATE TRIGGER event_recipients_user_exists AFTER INSERT ON event_recipients
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('users', 'user_id');

CREATE TRIGGER notifications_user_moved AFTER UPDATE OF organisation_id, user_id ON notifications FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION check_reference_moved('users', 'user_id');
CREATE TRIGGER deliveries_user_moved AFTER UPDATE OF organisation_id, user_id ON deliveries FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION check_reference_moved('users', 'user_id');
CREATE TRIGGER event_recipients_user_moved AFTER UPDATE OF organisation_id, user_id ON event_recipients FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION check_reference_moved('users', 'user_id');

CREATE TRIGGER users_delete_rows AFTER DELETE ON users
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION delete_referencing_rows('user_id', 'notifications', 'deliveries', 'event_recipients');
