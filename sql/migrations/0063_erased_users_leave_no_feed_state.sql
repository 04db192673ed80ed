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

-- What the application may not do itself, for the erasure alone, in the organisation of the
-- calling transaction (app.org_id; row-level security applies to the owner too):
-- - lock the user's digest runs, so a digest claim skips them from here, and say how many are
--   being sent (the erasure is then refused: the digest would reach the person after it);
-- - delete the text of in-app rows written before 0025, which kept a content row of their own
--   (same id as the row) with the recipient's name in it;
-- - keep the audit entries about the user (action, actor, time) without the values they
--   recorded: `before` and `after` become {"erased": true}. The log stays append-only otherwise.
-- Returns the digest runs being sent; when there are any, nothing else is done.
CREATE FUNCTION erase_user_records(p_user uuid)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    sending integer;
BEGIN
    IF org IS NULL OR p_user IS NULL THEN
        RAISE EXCEPTION 'erase_user_records: an organisation (app.org_id) and a user are required';
    END IF;
    SELECT count(*) FILTER (WHERE r.status = 'SENDING') INTO sending
    FROM (SELECT status FROM public.digest_runs WHERE organisation_id = org AND user_id = p_user FOR UPDATE) r;
    IF sending > 0 THEN
        RETURN sending;
    END IF;
    DELETE FROM public.notification_contents c
    USING public.notifications n
    WHERE n.organisation_id = org AND n.user_id = p_user AND n.content_id = n.id
      AND c.organisation_id = org AND c.id = n.id;
    UPDATE public.audit_log
    SET before = CASE WHEN before IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END,
        after = CASE WHEN after IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END
    WHERE organisation_id = org AND target_type = 'user' AND lower(target_id) = p_user::text;
    RETURN 0;
END
$$;
REVOKE ALL ON FUNCTION erase_user_records(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION erase_user_records(uuid) TO herald_app;
