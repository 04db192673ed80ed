-- A user's feed changes are numbered and logged only once the user has opened a live stream
-- (issue 12: the fan-out's cost per recipient).
--
-- Every change to a feed was numbered (feed_streams, one row per user who ever had a change) and
-- logged (feed_changes), for streams that most users never open. In a notify to 100 000 members,
-- the sweep that numbers the new rows took 5.15 s of PostgreSQL in 31 calls (pg_stat_statements,
-- bench database), against 2.70 s for writing the in-app rows themselves; a fan-out took 7.5–7.7 s
-- with the sweeps off against 8.8–9.7 s with them.
--
-- Now log_feed_changes() numbers and logs the changes of users who have a feed_streams row, and
-- only a stream creates one (feed_stream_open(), when it opens). The bus message (herald_stream)
-- still names every user whose feed changed: the feed cache drops their entries on it. A row due
-- later (deliver_at, expiry) still waits in feed_due, and the sweep still removes the due rows of
-- users without a stream, as it logs the others'.
--
-- The race: a user's first stream opening while a change of theirs is being logged. The stream's
-- first read (its position and the unread count) must see the change, or be followed by it in
-- the log. log_feed_changes() takes its users' stream locks shared, then looks for their rows;
-- feed_stream_open() takes the user's exclusively and creates the row, in a transaction of its
-- own; the stream reads its position and count after that committed. Either the logging
-- transaction committed first (the open waited for it, and the count sees the change), or the
-- logging looked after the open committed (each statement of a VOLATILE function takes a new
-- snapshot, so it sees the row and logs the change, numbered after the stream's start or seen by
-- its first read). The lock is taken shared by the statements that log changes (a sweep's batch,
-- a mark-read), which are short, never by a notify's chunk, which only writes feed_due; and
-- exclusively by a user's stream once, the first time ever, for one statement. While a first
-- open waits for a shared holder (a sweep's batch, some milliseconds), later logging statements
-- on the same key wait behind it: 64 keys shared by every organisation keep that rare.

-- The stream lock of a user: one of 64 advisory locks (a single-number key, beside other
-- single-number advisory locks: none in Herald), so first streams opening at once (a new
-- organisation's users signing in) seldom wait for each other, and a statement logging many
-- users' changes takes at most 64. Inlined where it is called (no SET clause, qualified names):
-- with a text hash and a search_path of its own it cost 485 ms of a 100 000-member fan-out.
CREATE FUNCTION feed_stream_lock_key(p_organisation uuid, p_user uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 4847526100::bigint OPERATOR(pg_catalog.+)
        ((pg_catalog.uuid_hash(p_organisation) OPERATOR(pg_catalog.#) pg_catalog.uuid_hash(p_user)) OPERATOR(pg_catalog.&) 63);

CREATE OR REPLACE FUNCTION log_feed_changes(p_organisations uuid[], p_users uuid[], p_kinds text[], p_notifications uuid[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
    SET plan_cache_mode = force_custom_plan
    SET enable_nestloop = off
    SET enable_sort = on
    SET enable_bitmapscan = on
AS $$
BEGIN
    IF coalesce(cardinality(p_users), 0) = 0 THEN
        RETURN;
    END IF;
    -- In key order, so two statements never wait for each other's keys.
    PERFORM pg_advisory_xact_lock_shared(l.key)
    FROM (SELECT DISTINCT feed_stream_lock_key(x.organisation_id, x.user_id) AS key
          FROM unnest(p_organisations, p_users) AS x (organisation_id, user_id) ORDER BY 1) l;

    WITH x AS (
        SELECT * FROM unnest(p_organisations, p_users, p_kinds, p_notifications) WITH ORDINALITY
            AS x (organisation_id, user_id, kind, notification_id, position)
    ),
    -- The users' stream rows, by primary key (an index scan whatever the statistics say; 0027).
    streamed AS (
        SELECT s.organisation_id, s.user_id FROM public.feed_streams s
        WHERE s.organisation_id = ANY (ARRAY(SELECT DISTINCT organisation_id FROM x))
          AND s.user_id = ANY (ARRAY(SELECT DISTINCT user_id FROM x))
    ),
    c AS (
        SELECT x.organisation_id, x.user_id, x.kind, x.notification_id,
               row_number() OVER (PARTITION BY x.organisation_id, x.user_id ORDER BY x.position) AS n,
               count(*) OVER (PARTITION BY x.organisation_id, x.user_id) AS total
        FROM x JOIN streamed s ON s.organisation_id = x.organisation_id AND s.user_id = x.user_id
    ),
    bumped AS (
        INSERT INTO public.feed_streams AS s (organisation_id, user_id, seq)
        SELECT organisation_id, user_id, count(*) FROM c GROUP BY organisation_id, user_id ORDER BY organisation_id, user_id
        ON CONFLICT (organisation_id, user_id) DO UPDATE SET seq = s.seq + excluded.seq
        RETURNING s.organisation_id, s.user_id, s.seq
    )
    INSERT INTO public.feed_changes (organisation_id, user_id, seq, kind, notification_id, created_at)
    SELECT c.organisation_id, c.user_id, b.seq - c.total + c.n, c.kind, c.notification_id, clock_timestamp()
    FROM c JOIN bumped b ON b.organisation_id = c.organisation_id AND b.user_id = c.user_id;

    PERFORM pg_notify('herald_stream', jsonb_build_object('org', g.organisation_id, 'users', g.users)::text)
    FROM (
        SELECT u.organisation_id, jsonb_agg(u.user_id) AS users
        FROM (
            SELECT d.organisation_id, d.user_id,
                   (row_number() OVER (PARTITION BY d.organisation_id ORDER BY d.user_id) - 1) / 150 AS chunk
            FROM (SELECT DISTINCT organisation_id, user_id FROM unnest(p_organisations, p_users) AS x (organisation_id, user_id)) d
        ) u
        GROUP BY u.organisation_id, u.chunk
    ) g;
END
$$;

-- A stream's start: the user's position in their log, created (under the user's stream lock, held
-- exclusively to the caller's commit) the first time. The caller runs it in a transaction of its
-- own, whose recipient is the user, and reads the position and the unread count after that one
-- committed, so the lock is held for this one statement. The owner's, as log_feed_changes() is:
-- the roles do not write feed_streams (0019). READ COMMITTED only: the argument above needs each
-- logging statement to look with a snapshot taken after the lock.
CREATE FUNCTION feed_stream_open(p_user uuid, OUT seq bigint, OUT purged_through bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    organisation uuid := nullif(current_setting('app.org_id', true), '')::uuid;
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
    PERFORM pg_advisory_xact_lock(feed_stream_lock_key(organisation, p_user));
    INSERT INTO public.feed_streams (organisation_id, user_id) VALUES (organisation, p_user)
    ON CONFLICT (organisation_id, user_id) DO NOTHING;
    SELECT s.seq, s.purged_through INTO seq, purged_through
    FROM public.feed_streams s WHERE s.organisation_id = organisation AND s.user_id = p_user;
END
$$;
REVOKE ALL ON FUNCTION feed_stream_open(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION feed_stream_open(uuid) TO herald_app;
