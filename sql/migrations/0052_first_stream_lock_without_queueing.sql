-- A user's first stream takes its stream lock without queueing for it (while it can).
--
-- The stream locks are 64 keys shared by every organisation (feed_stream_lock_key, 0043). A
-- notify's in-app rows and every logged feed change hold their users' keys shared to their
-- commit (0043, 0046); a first stream takes its user's key exclusively. A queued exclusive request
-- makes every later shared request of the same key wait behind it, so one first stream waiting
-- for a fan-out chunk's commit (up to a second) held up the feed writes of every organisation
-- whose users share that key meanwhile. In the test suite it closed a cycle: a test holding a
-- notify uncommitted while it marks all read waited behind another test's first stream, which
-- waited for that notify (the database's 30 s timeout, twice in a day's runs).
--
-- Now the first stream tries the key every 10 ms for up to 5 s without queueing, so shared
-- requests never wait behind it, and only then queues for it as before. What it waits for is the
-- same (the shared holders' commits), so 0043's argument is unchanged.
CREATE OR REPLACE FUNCTION feed_stream_open(p_user uuid, OUT seq bigint, OUT purged_through bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    organisation uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    locked boolean := false;
BEGIN
    SELECT s.seq, s.purged_through INTO seq, purged_through
    FROM public.feed_streams s WHERE s.organisation_id = organisation AND s.user_id = p_user;
    IF FOUND THEN
        RETURN;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'feed_stream_open: needs READ COMMITTED (the stream lock''s argument)';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.users u WHERE u.organisation_id = organisation AND u.id = p_user) THEN
        RAISE EXCEPTION 'feed_stream_open: no such user in this organisation' USING ERRCODE = 'foreign_key_violation';
    END IF;
    FOR attempt IN 1 .. 500 LOOP
        locked := pg_try_advisory_xact_lock(feed_stream_lock_key(organisation, p_user));
        EXIT WHEN locked;
        PERFORM pg_sleep(0.01);
    END LOOP;
    IF NOT locked THEN
        PERFORM pg_advisory_xact_lock(feed_stream_lock_key(organisation, p_user));
    END IF;
    INSERT INTO public.feed_streams (organisation_id, user_id) VALUES (organisation, p_user)
    ON CONFLICT (organisation_id, user_id) DO NOTHING;
    SELECT s.seq, s.purged_through INTO seq, purged_through
    FROM public.feed_streams s WHERE s.organisation_id = organisation AND s.user_id = p_user;
END
$$;
