-- A row shown at once waits in feed_due only when its user has opened a stream (issue 12: the
-- fan-out's cost per recipient).
--
-- Every new in-app row went to feed_due, due at visible_at, for feed_stream_sweep() to number and
-- log; since 0043 the sweep logs only the changes of users who have opened a stream, and for the
-- others only deletes the row again and names the user on herald_stream, which the feed cache
-- drops the user's entries on. For a row shown at once that message says nothing new: the
-- event's commit is announced on herald_events, on which every server's feed cache drops the
-- whole organisation. So a row shown at once is written to feed_due only for a user with a
-- feed_streams row; a row shown later (deliver_at) and an expiry still wait there for everyone,
-- as the sweep's message at their time is what tells the caches.
--
-- Measured on the bench database (100 000 members, one INSERT of their in-app rows as the
-- application role, rolled back, alternated twice): 2.10 and 2.35 s with the feed_due rows,
-- 1.73 and 1.69 s without; and the sweep no longer deletes 100 000 rows after the fan-out.
--
-- The race with a user's first stream (0043's argument, from the other side): the stream's first
-- read must see the row, or the row's change must be logged after the stream's start. The
-- trigger takes the stream locks of the users of rows shown at once, shared, before it looks for
-- their feed_streams rows; feed_stream_open() takes the user's exclusively. Either the open
-- committed first (the trigger's next statement sees the row, and the change is logged), or the
-- open waits for this transaction's commit (and the stream's first read counts the row). A
-- notify's chunk now holds those locks shared until it commits (its last statements, a fraction
-- of a second): a first stream opening meanwhile waits that long, once in the user's life.
CREATE OR REPLACE FUNCTION log_feed_insert() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    -- The statement's start, not the transaction's: notify takes deliver_at after its BEGIN.
    shown_at timestamptz := statement_timestamp();
BEGIN
    -- In key order, as log_feed_changes() takes them: two statements never wait for each other.
    PERFORM pg_advisory_xact_lock_shared(l.key)
    FROM (SELECT DISTINCT feed_stream_lock_key(a.organisation_id, a.user_id) AS key FROM added a
          WHERE a.visible_at <= shown_at ORDER BY 1) l;

    INSERT INTO public.feed_due (organisation_id, notification_id, kind, user_id, due_at)
    SELECT a.organisation_id, a.id, 'created', a.user_id, a.visible_at FROM added a
    WHERE a.visible_at > shown_at
       OR EXISTS (SELECT 1 FROM public.feed_streams s WHERE s.organisation_id = a.organisation_id AND s.user_id = a.user_id)
    UNION ALL
    SELECT a.organisation_id, a.id, 'expired', a.user_id, a.expires_at FROM added a WHERE a.expires_at IS NOT NULL;
    RETURN NULL;
END
$$;
