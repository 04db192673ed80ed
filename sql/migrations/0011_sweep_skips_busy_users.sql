-- The stream sweep (0010) never waits for one user while it holds everyone else's work.
--
-- Before: feed_stream_sweep() claimed up to p_limit due moments of every organisation (SKIP
-- LOCKED), then bumped each of their users' feed_streams rows, waiting for any user whose row a
-- transaction held (a "mark read" in a request that had not committed yet). While it waited, the
-- moments it had claimed were locked, so every other instance's sweep skipped them: one slow
-- transaction of one user held back the live feeds of every organisation in the batch (seen in CI
-- as a stream that did not hear three notifies for ten seconds under load). The retention purge
-- waited the same way.
--
-- Now both steps lock the users' feed_streams rows first, with SKIP LOCKED, and take only the
-- moments and old changes of the users they hold; the rest stay for the next sweep (at most a
-- second later, or as soon as the next notify commits). A user without a feed_streams row yet
-- (no change logged so far) is taken too: log_feed_changes() inserts the row, which waits only if
-- another transaction is inserting that same user's first row at that moment.
CREATE OR REPLACE FUNCTION feed_stream_sweep(p_limit integer, p_retention interval, p_now timestamptz DEFAULT now(), p_organisation uuid DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    logged integer;
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 OR p_retention IS NULL OR p_retention < interval '1 minute' OR p_now IS NULL THEN
        RAISE EXCEPTION 'feed_stream_sweep: limit must be 1 to 100000 and retention at least a minute';
    END IF;
    PERFORM set_config('herald.sweeping', 'on', true);

    WITH due AS (
        SELECT d.organisation_id, d.notification_id, d.kind, d.user_id FROM public.feed_due d
        WHERE d.due_at <= p_now AND (p_organisation IS NULL OR d.organisation_id = p_organisation)
        ORDER BY d.due_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    held AS (
        SELECT s.organisation_id, s.user_id FROM public.feed_streams s
        WHERE (s.organisation_id, s.user_id) IN (SELECT organisation_id, user_id FROM due)
        ORDER BY s.organisation_id, s.user_id
        FOR UPDATE SKIP LOCKED
    ),
    ready AS (
        SELECT organisation_id, user_id FROM held
        UNION
        SELECT d.organisation_id, d.user_id FROM due d
        WHERE NOT EXISTS (SELECT 1 FROM public.feed_streams s WHERE s.organisation_id = d.organisation_id AND s.user_id = d.user_id)
    ),
    claimed AS (
        DELETE FROM public.feed_due d USING due JOIN ready r ON r.organisation_id = due.organisation_id AND r.user_id = due.user_id
        WHERE d.organisation_id = due.organisation_id AND d.notification_id = due.notification_id AND d.kind = due.kind
        RETURNING d.organisation_id, d.user_id, d.notification_id, d.kind
    )
    SELECT count(*), log_feed_changes(array_agg(organisation_id ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(user_id ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(kind ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(notification_id ORDER BY organisation_id, user_id, notification_id))
    INTO logged FROM claimed;

    WITH old AS (
        SELECT c.organisation_id, c.user_id, c.seq FROM public.feed_changes c
        WHERE c.created_at < p_now - p_retention AND (p_organisation IS NULL OR c.organisation_id = p_organisation)
        ORDER BY c.created_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    held AS (
        SELECT s.organisation_id, s.user_id FROM public.feed_streams s
        WHERE (s.organisation_id, s.user_id) IN (SELECT organisation_id, user_id FROM old)
        ORDER BY s.organisation_id, s.user_id
        FOR UPDATE SKIP LOCKED
    ),
    removed AS (
        DELETE FROM public.feed_changes c USING old JOIN held h ON h.organisation_id = old.organisation_id AND h.user_id = old.user_id
        WHERE c.organisation_id = old.organisation_id AND c.user_id = old.user_id AND c.seq = old.seq
        RETURNING c.organisation_id, c.user_id, c.seq
    )
    UPDATE public.feed_streams s SET purged_through = greatest(s.purged_through, r.seq)
    FROM (SELECT organisation_id, user_id, max(seq) AS seq FROM removed GROUP BY organisation_id, user_id) r
    WHERE s.organisation_id = r.organisation_id AND s.user_id = r.user_id;

    DELETE FROM public.stream_tickets t
    WHERE (t.organisation_id, t.id) IN (
        SELECT organisation_id, id FROM public.stream_tickets
        WHERE expires_at < p_now - interval '1 hour' AND (p_organisation IS NULL OR organisation_id = p_organisation) LIMIT p_limit);

    PERFORM set_config('herald.sweeping', '', true);
    RETURN logged;
END
$$;
