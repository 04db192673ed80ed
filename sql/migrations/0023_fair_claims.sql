-- Delivery claims take turns between organisations (issue 12, fairness).
--
-- claim_deliveries() took the oldest due rows of every organisation together. After one
-- organisation's fan-out to a million, another organisation's critical alert waited behind a
-- million older rows: worker slots went first come, first served. Now a worker asks which
-- organisations have due work (due_delivery_organisations, the organisation waiting longest
-- first, with how many rows each has due, up to the claim's size) and claims each one's share
-- with claim_deliveries(..., p_organisation): a claim per organisation, which is also the form a
-- distributed PostgreSQL can route to one shard. The shares fill the claim from the organisation
-- with the least due work up (see OutboxQueue.claim).
--
-- A claim for one organisation walks that organisation's due rows in time order: the index
-- below. It replaces deliveries_pending (PENDING only, same columns), which it covers.
CREATE INDEX deliveries_due ON deliveries (organisation_id, next_attempt_at) WHERE status IN ('PENDING', 'FAILED');
DROP INDEX deliveries_pending;

-- claim_deliveries() is called with and without p_organisation; its statements' "p_organisation
-- IS NULL OR organisation_id = p_organisation" can use the index above only in a plan made for
-- the value at hand, so each call is planned (about a millisecond).
ALTER FUNCTION claim_deliveries(text, integer, integer, uuid) SET plan_cache_mode = force_custom_plan;

-- Expired leases are rescued by claim_deliveries() for the organisations it claims from; this
-- rescues them everywhere (the workers' heartbeat calls it), so an organisation with nothing
-- else due gets its stalled rows back too. Returns how many rows it rescued.
CREATE FUNCTION rescue_expired_deliveries(p_worker text)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    rescued integer;
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'rescue_expired_deliveries: a worker name of 1 to 200 characters is required';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);
    WITH expired AS (
        UPDATE public.deliveries d
        SET status = CASE WHEN d.attempts >= d.max_attempts THEN 'DEAD' ELSE 'FAILED' END,
            last_error = 'lease expired: the worker stopped before finishing', next_attempt_at = now(),
            lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE d.status = 'SENDING' AND d.lease_expires_at < now()
        RETURNING d.organisation_id, d.id, d.attempts, d.updated_at
    ), logged AS (
        INSERT INTO public.delivery_attempts (organisation_id, delivery_id, attempt, worker, started_at, outcome, error)
        SELECT e.organisation_id, e.id, e.attempts, p_worker, e.updated_at, 'EXPIRED', 'lease expired'
        FROM expired e
        ON CONFLICT DO NOTHING
    )
    SELECT count(*) INTO rescued FROM expired;
    PERFORM set_config('herald.claiming', '', true);
    RETURN rescued;
END
$$;
REVOKE ALL ON FUNCTION rescue_expired_deliveries(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rescue_expired_deliveries(text) TO herald_worker;

-- The organisations with deliveries due now, the one whose oldest due row waited longest first,
-- at most p_limit, each with how many rows it has due (counted up to p_limit). The organisations
-- are found by skipping through deliveries_due one organisation at a time (a loose index scan),
-- so the cost follows the number of organisations with work, not the number of rows.
CREATE FUNCTION due_delivery_organisations(p_limit integer)
    RETURNS TABLE (organisation_id uuid, due integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'due_delivery_organisations: limit must be 1 to 1000';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);
    RETURN QUERY
    WITH RECURSIVE orgs AS (
        (SELECT d.organisation_id FROM public.deliveries d WHERE d.status IN ('PENDING', 'FAILED')
         ORDER BY d.organisation_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.organisation_id FROM public.deliveries d
                WHERE d.status IN ('PENDING', 'FAILED') AND d.organisation_id > o.organisation_id
                ORDER BY d.organisation_id LIMIT 1)
        FROM orgs o WHERE o.organisation_id IS NOT NULL
    )
    SELECT o.organisation_id, c.due::integer
    FROM orgs o
    CROSS JOIN LATERAL (
        SELECT count(*) AS due, min(x.next_attempt_at) AS oldest FROM (
            SELECT d.next_attempt_at FROM public.deliveries d
            WHERE d.organisation_id = o.organisation_id AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at LIMIT p_limit) x
    ) c
    WHERE o.organisation_id IS NOT NULL AND c.due > 0
    ORDER BY c.oldest
    LIMIT p_limit;
    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION due_delivery_organisations(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION due_delivery_organisations(integer) TO herald_worker;
