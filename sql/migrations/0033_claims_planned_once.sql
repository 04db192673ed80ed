-- Issue 12 (delivery's cost per message): a claim planned once per connection, not per call.
--
-- 0023 made claim_deliveries plan every call (plan_cache_mode = force_custom_plan): its
-- statements said "p_organisation IS NULL OR organisation_id = p_organisation", and only a plan
-- made for the value at hand could walk deliveries_due for one organisation. The workers now
-- always claim for one organisation (due_delivery_organisations names them), so the claim of the
-- due rows is written out twice: one branch for an organisation, one for all (tests, and callers
-- without one), each saying exactly what it filters on. The rescue of expired leases keeps one
-- form: it walks deliveries_lease_claim either way. The generic plans walk the same indexes as
-- the custom ones did, and PL/pgSQL keeps them for the connection.
-- On the bench database (10 000 due rows of one organisation, 400 claims of 25 in `psql`, one
-- transaction each run): 0.57-0.67 s against 0.96-1.40 s planned per call, about a millisecond
-- a claim. Their generic plans (EXPLAIN on the bench database): the due rows by deliveries_due
-- from the organisation's oldest, the expired leases by deliveries_lease_claim.
CREATE OR REPLACE FUNCTION claim_deliveries(p_worker text, p_limit integer, p_lease_seconds integer, p_organisation uuid DEFAULT NULL)
    RETURNS TABLE (organisation_id uuid, delivery_id uuid, attempt integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    -- As 0020 set it: a burst of new rows is not in the statistics yet, and a bitmap scan would
    -- read and sort every due row to take a few. (Replacing the function also drops 0023's
    -- plan_cache_mode = force_custom_plan.)
    SET enable_bitmapscan = off
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_deliveries: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'claim_deliveries: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);
    -- Expired leases by deliveries_lease_claim, whatever the organisation: one form serves both.
    WITH expired AS (
        UPDATE public.deliveries d
        SET status = CASE WHEN d.attempts >= d.max_attempts THEN 'DEAD' ELSE 'FAILED' END,
            last_error = 'lease expired: the worker stopped before finishing', next_attempt_at = now(),
            lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE d.status = 'SENDING' AND d.lease_expires_at < now()
          AND (p_organisation IS NULL OR d.organisation_id = p_organisation)
        RETURNING d.organisation_id, d.id, d.attempts, d.updated_at
    )
    INSERT INTO public.delivery_attempts (organisation_id, delivery_id, attempt, worker, started_at, outcome, error)
    SELECT e.organisation_id, e.id, e.attempts, p_worker, e.updated_at, 'EXPIRED', 'lease expired'
    FROM expired e
    ON CONFLICT DO NOTHING;

    -- The due rows: by deliveries_due for one organisation, by time for all.
    IF p_organisation IS NULL THEN
        RETURN QUERY
        WITH due AS (
            SELECT d.organisation_id, d.id FROM public.deliveries d
            WHERE d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE public.deliveries d
        SET status = 'SENDING', attempts = d.attempts + 1, lease_owner = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
        FROM due WHERE d.organisation_id = due.organisation_id AND d.id = due.id
        RETURNING d.organisation_id, d.id, d.attempts;
    ELSE
        RETURN QUERY
        WITH due AS (
            SELECT d.organisation_id, d.id FROM public.deliveries d
            WHERE d.organisation_id = p_organisation AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE public.deliveries d
        SET status = 'SENDING', attempts = d.attempts + 1, lease_owner = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
        FROM due WHERE d.organisation_id = due.organisation_id AND d.id = due.id
        RETURNING d.organisation_id, d.id, d.attempts;
    END IF;
    PERFORM set_config('herald.claiming', '', true);
END
$$;
