-- The stream sweep deletes the rows it claimed by their tuple ids (issue 10: the sweep fell
-- minutes behind a million-member fan-out; issue 12: it took the cores a fan-out needs).
--
-- feed_stream_sweep() deleted its claimed feed_due rows with "DELETE ... USING due JOIN ready"
-- and matched feed_due to the batch through the organisation, the notification and the kind.
-- With statistics from before a burst (feed_due believed almost empty) and nested loops off
-- (0022), the planner joined feed_due to the ready users on the organisation alone, then to the
-- batch: within one organisation that is every due row times every ready user. auto_explain on a
-- fresh database, one sweep of 5 000 rows out of 10 000 due, one organisation: a hash join of
-- 50 000 000 rows, 14.2 s; with statistics, 0.14-0.19 s. In make bench's 100 000-member
-- fan-out, pg_stat_statements counted 52.9 s of sweeping (44 calls) in 26.5 s of fan-out: the
-- sweeps held both cores while the chunks waited for them.
--
-- The batch is locked (FOR UPDATE SKIP LOCKED), so its rows' tuple ids cannot change before the
-- DELETE: it now deletes by ctid (a TID scan of the batch's ids, no join with feed_due), after
-- joining the batch to the ready users on both the organisation and the user. The purge of old
-- changes had the same shape and gets the same treatment. The SET clauses of 0018 and 0022 are
-- repeated: CREATE OR REPLACE would drop them.
CREATE OR REPLACE FUNCTION feed_stream_sweep(p_limit integer, p_retention interval, p_now timestamptz DEFAULT now(), p_organisation uuid DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    SET plan_cache_mode = force_custom_plan
    SET enable_nestloop = off
AS $$
DECLARE
    logged integer;
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 OR p_retention IS NULL OR p_retention < interval '1 minute' OR p_now IS NULL THEN
        RAISE EXCEPTION 'feed_stream_sweep: limit must be 1 to 100000 and retention at least a minute';
    END IF;
    PERFORM set_config('herald.sweeping', 'on', true);

    WITH due AS (
        SELECT d.ctid AS tid, d.organisation_id, d.notification_id, d.kind, d.user_id FROM public.feed_due d
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
        DELETE FROM public.feed_due d
        WHERE d.ctid = ANY (ARRAY(SELECT due.tid FROM due JOIN ready r ON r.organisation_id = due.organisation_id AND r.user_id = due.user_id))
        RETURNING d.organisation_id, d.user_id, d.notification_id, d.kind
    )
    SELECT count(*), log_feed_changes(array_agg(organisation_id ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(user_id ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(kind ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(notification_id ORDER BY organisation_id, user_id, notification_id))
    INTO logged FROM claimed;

    WITH old AS (
        SELECT c.ctid AS tid, c.organisation_id, c.user_id, c.seq FROM public.feed_changes c
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
        DELETE FROM public.feed_changes c
        WHERE c.ctid = ANY (ARRAY(SELECT old.tid FROM old JOIN held h ON h.organisation_id = old.organisation_id AND h.user_id = old.user_id))
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
