-- The stream sweep's cost follows its batch, not its tables: it deletes the rows it claimed by
-- their tuple ids and finds its users' stream rows by primary key (issue 10: the sweep fell
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
-- changes had the same shape and gets the same treatment.
--
-- Two more costs grew with the table, not the batch, and showed in a million-member fan-out
-- (393.6 s of sweeping in 509 calls while 1 100 000 rows were numbered, after the fix above):
-- - The batch's users' feed_streams rows were found by a hash join, which reads every row of
--   feed_streams (one per user who ever had a change: a million) for each batch: nested loops
--   are off (0022). They are now looked up through the primary key with arrays of the batch's
--   organisations and users (= ANY), which is an index scan whatever the statistics say. The
--   lookup no longer asks for key order: PostgreSQL 15 keeps an index's order only for an array
--   on its first column, so the users' array became a filter over every stream row of the
--   organisation (2.4 s a batch). The order guarded nothing: SKIP LOCKED never waits for a lock,
--   so two sweeps cannot deadlock on these rows.
-- - With statistics from before the burst, the claim of the oldest due rows was a bitmap scan of
--   every due row and a sort, each sweep reading the whole backlog (700 000 rows behind a
--   million) and the dead tuples of earlier sweeps, which bitmap scans never mark dead in the
--   index. Bitmap scans and sorts are now off in the sweep, so the claim walks feed_due_claim
--   in order and stops at the batch's size (sorts the statement needs still run).
--
-- The SET clauses of 0018 and 0022 are repeated: CREATE OR REPLACE would drop them.
CREATE OR REPLACE FUNCTION feed_stream_sweep(p_limit integer, p_retention interval, p_now timestamptz DEFAULT now(), p_organisation uuid DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    SET plan_cache_mode = force_custom_plan
    SET enable_nestloop = off
    SET enable_bitmapscan = off
    SET enable_sort = off
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
        WHERE s.organisation_id = ANY (ARRAY(SELECT DISTINCT organisation_id FROM due))
          AND s.user_id = ANY (ARRAY(SELECT DISTINCT user_id FROM due))
        FOR UPDATE SKIP LOCKED
    ),
    present AS (
        SELECT s.organisation_id, s.user_id FROM public.feed_streams s
        WHERE s.organisation_id = ANY (ARRAY(SELECT DISTINCT organisation_id FROM due))
          AND s.user_id = ANY (ARRAY(SELECT DISTINCT user_id FROM due))
    ),
    ready AS (
        SELECT organisation_id, user_id FROM held
        UNION
        SELECT d.organisation_id, d.user_id FROM due d
        WHERE NOT EXISTS (SELECT 1 FROM present p WHERE p.organisation_id = d.organisation_id AND p.user_id = d.user_id)
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
        WHERE s.organisation_id = ANY (ARRAY(SELECT DISTINCT organisation_id FROM old))
          AND s.user_id = ANY (ARRAY(SELECT DISTINCT user_id FROM old))
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

-- log_feed_changes() runs inside the sweep and would inherit its settings: its window functions
-- and aggregates are planned best with sorts (with them off, one sweep of 10 000 rows took
-- 1.09 s instead of 0.30 s on the scratch database above).
ALTER FUNCTION log_feed_changes(uuid[], uuid[], text[], uuid[]) SET enable_sort = on;
ALTER FUNCTION log_feed_changes(uuid[], uuid[], text[], uuid[]) SET enable_bitmapscan = on;
