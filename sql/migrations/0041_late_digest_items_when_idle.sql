-- Issue 12 (digests at scale): the slot pass of claim_digest_runs moved late items on every call.
--
-- claim_digest_runs (0012) makes, at most every half second per worker, the runs of the slots that
-- have come, 1 000 (user, frequency, slot) groups a call. Before that it moved late items
-- (committed after their slot's run was frozen) to the next slot, by walking every frozen run of
-- the organisation and probing its items: 88 ms a call at 10 000 runs (auto_explain during the
-- bench's digest run), growing with each run made, 1.7 s of PostgreSQL time per 10 000 digests.
--
-- A late item's group is selected by the make pass like any other and can never get a run (its
-- slot's run exists): the pass's INSERT ... ON CONFLICT DO NOTHING makes fewer runs than it
-- selected groups. Late items are now moved in that case only, by the same pass, and the walk is
-- not made at all when every selected group got its run (or none was selected). Otherwise the
-- function is 0012's, kept off bitmap scans (0040).

CREATE OR REPLACE FUNCTION claim_digest_runs(p_worker text, p_limit integer, p_lease_seconds integer, p_now timestamptz DEFAULT now(),
                                             p_organisation uuid DEFAULT NULL, p_make boolean DEFAULT true)
    RETURNS TABLE (organisation_id uuid, run_id uuid, attempt integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    SET enable_bitmapscan = off
AS $$
DECLARE
    n_selected integer := 0;
    n_made integer := 0;
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_digest_runs: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 OR p_now IS NULL THEN
        RAISE EXCEPTION 'claim_digest_runs: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);

    -- p_make false: only lease (a worker makes runs about once per poll, not in every claim).
    IF p_make THEN
        -- A run per slot that has come and has pending email items (unique: made once), with its
        -- items attached in the same statement: the run is frozen as it is made. A claim that loses
        -- the race for a run (ON CONFLICT) attaches nothing; the items were the winner's.
        WITH slots AS (
            SELECT i.organisation_id, i.user_id, i.frequency, i.slot_at, count(*)::integer AS items FROM public.digest_items i
            WHERE i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.channel = 'email' AND i.slot_at <= p_now
              AND (p_organisation IS NULL OR i.organisation_id = p_organisation)
            GROUP BY i.organisation_id, i.user_id, i.frequency, i.slot_at
            LIMIT 1000
        ),
        made AS (
            INSERT INTO public.digest_runs AS r (organisation_id, id, user_id, frequency, slot_at, next_attempt_at, frozen_at, item_count)
            SELECT s.organisation_id, gen_random_uuid(), s.user_id, s.frequency, s.slot_at, s.slot_at, now(), s.items FROM slots s
            ON CONFLICT ON CONSTRAINT digest_runs_slot_unique DO NOTHING
            RETURNING r.organisation_id, r.id, r.user_id, r.frequency, r.slot_at
        ),
        attached AS (
            UPDATE public.digest_items i SET run_id = m.id
            FROM made m
            WHERE i.organisation_id = m.organisation_id AND i.user_id = m.user_id AND i.frequency = m.frequency AND i.slot_at = m.slot_at
              AND i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.channel = 'email'
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM slots), (SELECT count(*) FROM made) INTO n_selected, n_made;

        -- Late items: their slot's run was frozen before they committed. A selected group that got
        -- no run (above) is one, or another claim's run made at the same moment; either way the
        -- walk below moves only items whose slot's run is frozen.
        IF n_made < n_selected THEN
            UPDATE public.digest_items i
            SET slot_at = ((r.slot_at AT TIME ZONE z.zone) + CASE r.frequency WHEN 'DAILY' THEN interval '1 day' ELSE interval '7 days' END) AT TIME ZONE z.zone
            FROM public.digest_runs r,
                 LATERAL (SELECT coalesce(u.timezone, o.default_timezone) AS zone
                          FROM public.users u JOIN public.organisations o ON o.id = u.organisation_id
                          WHERE u.organisation_id = r.organisation_id AND u.id = r.user_id) z
            WHERE i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.channel = 'email' AND i.slot_at <= p_now
              AND (p_organisation IS NULL OR i.organisation_id = p_organisation)
              AND r.organisation_id = i.organisation_id AND r.user_id = i.user_id AND r.frequency = i.frequency AND r.slot_at = i.slot_at
              AND r.frozen_at IS NOT NULL;
        END IF;
    END IF;

    UPDATE public.digest_runs r
    SET status = CASE WHEN r.attempts >= r.max_attempts THEN 'DEAD' ELSE 'FAILED' END,
        last_error = 'lease expired: the worker stopped before finishing', next_attempt_at = p_now,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE r.status = 'SENDING' AND r.lease_expires_at < now()
      AND (p_organisation IS NULL OR r.organisation_id = p_organisation);

    RETURN QUERY
    WITH due AS (
        SELECT r.organisation_id, r.id FROM public.digest_runs r
        WHERE r.status IN ('PENDING', 'FAILED') AND r.next_attempt_at <= p_now
          AND (p_organisation IS NULL OR r.organisation_id = p_organisation)
        ORDER BY r.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE public.digest_runs r
    SET status = 'SENDING', attempts = r.attempts + 1, lease_owner = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    FROM due WHERE r.organisation_id = due.organisation_id AND r.id = due.id
    RETURNING r.organisation_id, r.id, r.attempts;

    PERFORM set_config('herald.claiming', '', true);
END
$$;
