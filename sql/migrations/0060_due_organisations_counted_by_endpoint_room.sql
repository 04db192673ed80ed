-- Review of 0059: the organisations a claim serves are counted by what it can take.
--
-- 0059 left the rows of a full endpoint, or of one whose circuit is open, due and untouched, but
-- due_delivery_organisations still counted them and ordered organisations by them: an
-- organisation whose only due rows wait for a dead endpoint took a share of every claim and came
-- back empty, and enough of them would have kept the others out of the list. Its count of
-- endpoint rows also walked every waiting endpoint row of the organisation (the due time comes
-- after the endpoint in deliveries_due_endpoint, so it bounds nothing).
--
-- Both functions now take the endpoints' room from one place, claimable_endpoints: each endpoint
-- of the organisation with the sends the claiming pool has room for (what it says for its busy
-- endpoints, the per-endpoint limit for the others; none while a circuit is open, one while
-- half-open). due_delivery_organisations takes the pool's room too, counts each endpoint's due
-- rows up to that room (and up to the limit) by the endpoint's own range of the index, and
-- orders organisations by the oldest row a claim could take.
CREATE FUNCTION check_endpoint_room(p_caller text, p_endpoint_room integer, p_busy_endpoints uuid[], p_busy_room integer[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_endpoint_room IS NULL OR p_endpoint_room < 0 OR p_busy_endpoints IS NULL OR p_busy_room IS NULL
       OR cardinality(p_busy_endpoints) <> cardinality(p_busy_room) OR array_position(p_busy_room, NULL) IS NOT NULL
       OR array_position(p_busy_endpoints, NULL) IS NOT NULL THEN
        RAISE EXCEPTION '%: an endpoint room of 0 or more, and one room (not null) per busy endpoint', p_caller;
    END IF;
END
$$;

-- Runs inside the two SECURITY DEFINER functions below, as their owner, while they have
-- herald.claiming on (0059's owner_claims_read on endpoints); nobody else may call it. Without
-- a SET clause, so the planner inlines it into their statements (a function it cannot inline is
-- a scan of unknown size, and the claim's plan then read every waiting row of the endpoint);
-- its tables are qualified, and its callers set the search path.
CREATE FUNCTION claimable_endpoints(p_organisation uuid, p_endpoint_room integer, p_busy_endpoints uuid[], p_busy_room integer[])
    RETURNS TABLE (id uuid, room integer)
    LANGUAGE sql STABLE
AS $$
    SELECT e.id, CASE WHEN e.circuit_opened_at IS NOT NULL THEN least(1, r.room) ELSE r.room END
    FROM public.endpoints e
    CROSS JOIN LATERAL (
        SELECT greatest(0, coalesce(
            (SELECT b.room FROM unnest(p_busy_endpoints, p_busy_room) AS b (id, room) WHERE b.id = e.id LIMIT 1),
            p_endpoint_room)) AS room) r
    WHERE e.organisation_id = p_organisation
      AND (e.circuit_opened_at IS NULL OR e.circuit_retry_at IS NULL OR e.circuit_retry_at <= pg_catalog.now())
$$;
REVOKE ALL ON FUNCTION check_endpoint_room(text, integer, uuid[], integer[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION claimable_endpoints(uuid, integer, uuid[], integer[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION claim_deliveries(
    p_worker text, p_limit integer, p_lease_seconds integer, p_organisation uuid DEFAULT NULL,
    p_endpoint_room integer DEFAULT 1000, p_busy_endpoints uuid[] DEFAULT '{}', p_busy_room integer[] DEFAULT '{}')
    RETURNS TABLE (organisation_id uuid, delivery_id uuid, attempt integer, endpoint_id uuid)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    SET enable_bitmapscan = off
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_deliveries: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'claim_deliveries: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM public.check_endpoint_room('claim_deliveries', p_endpoint_room, p_busy_endpoints, p_busy_room);
    PERFORM set_config('herald.claiming', 'on', true);
    -- Expired leases by deliveries_lease_claim, whatever the organisation (as 0033).
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

    IF p_organisation IS NULL THEN
        -- Every organisation by time (tests and callers without one): no endpoint's room applies.
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
        RETURNING d.organisation_id, d.id, d.attempts, d.endpoint_id;
    ELSE
        RETURN QUERY
        WITH room AS MATERIALIZED (
            SELECT r.id, r.room FROM public.claimable_endpoints(p_organisation, p_endpoint_room, p_busy_endpoints, p_busy_room) r
        ), by_endpoint AS (
            -- Each endpoint's oldest due rows, as many as it has room for, by deliveries_due_endpoint.
            SELECT x.id, x.next_attempt_at
            FROM room
            CROSS JOIN LATERAL (
                SELECT d.id, d.next_attempt_at FROM public.deliveries d
                WHERE d.organisation_id = p_organisation AND d.endpoint_id = room.id
                  AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
                ORDER BY d.next_attempt_at
                LIMIT least(room.room, p_limit)
                FOR UPDATE OF d SKIP LOCKED
            ) x
            WHERE room.room > 0
        ), direct AS (
            -- The rows without an endpoint (email), by deliveries_due_direct.
            SELECT d.id, d.next_attempt_at FROM public.deliveries d
            WHERE d.organisation_id = p_organisation AND d.endpoint_id IS NULL
              AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ), due AS (
            SELECT c.id FROM (SELECT * FROM by_endpoint UNION ALL SELECT * FROM direct) c
            ORDER BY c.next_attempt_at
            LIMIT p_limit
        )
        UPDATE public.deliveries d
        SET status = 'SENDING', attempts = d.attempts + 1, lease_owner = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
        FROM due WHERE d.organisation_id = p_organisation AND d.id = due.id
        RETURNING d.organisation_id, d.id, d.attempts, d.endpoint_id;
    END IF;
    PERFORM set_config('herald.claiming', '', true);
END
$$;

DROP FUNCTION due_delivery_organisations(integer);
CREATE FUNCTION due_delivery_organisations(
    p_limit integer, p_endpoint_room integer DEFAULT 1000, p_busy_endpoints uuid[] DEFAULT '{}', p_busy_room integer[] DEFAULT '{}')
    RETURNS TABLE (organisation_id uuid, due integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    SET enable_bitmapscan = off
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'due_delivery_organisations: limit must be 1 to 1000';
    END IF;
    PERFORM public.check_endpoint_room('due_delivery_organisations', p_endpoint_room, p_busy_endpoints, p_busy_room);
    PERFORM set_config('herald.claiming', 'on', true);
    RETURN QUERY
    WITH RECURSIVE direct_orgs AS (
        (SELECT d.organisation_id FROM public.deliveries d WHERE d.status IN ('PENDING', 'FAILED') AND d.endpoint_id IS NULL
         ORDER BY d.organisation_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.organisation_id FROM public.deliveries d
                WHERE d.status IN ('PENDING', 'FAILED') AND d.endpoint_id IS NULL AND d.organisation_id > o.organisation_id
                ORDER BY d.organisation_id LIMIT 1)
        FROM direct_orgs o WHERE o.organisation_id IS NOT NULL
    ), endpoint_orgs AS (
        (SELECT d.organisation_id FROM public.deliveries d WHERE d.status IN ('PENDING', 'FAILED') AND d.endpoint_id IS NOT NULL
         ORDER BY d.organisation_id LIMIT 1)
        UNION ALL
        SELECT (SELECT d.organisation_id FROM public.deliveries d
                WHERE d.status IN ('PENDING', 'FAILED') AND d.endpoint_id IS NOT NULL AND d.organisation_id > o.organisation_id
                ORDER BY d.organisation_id LIMIT 1)
        FROM endpoint_orgs o WHERE o.organisation_id IS NOT NULL
    ), orgs AS (
        SELECT o.organisation_id FROM direct_orgs o WHERE o.organisation_id IS NOT NULL
        UNION
        SELECT o.organisation_id FROM endpoint_orgs o WHERE o.organisation_id IS NOT NULL
    )
    SELECT o.organisation_id, least(p_limit, direct.due + by_endpoint.due)::integer
    FROM orgs o
    CROSS JOIN LATERAL (
        SELECT count(*) AS due, min(x.next_attempt_at) AS oldest FROM (
            SELECT d.next_attempt_at FROM public.deliveries d
            WHERE d.organisation_id = o.organisation_id AND d.endpoint_id IS NULL
              AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at LIMIT p_limit) x
    ) direct
    CROSS JOIN LATERAL (
        -- Each endpoint's due rows up to its room, by its own range of deliveries_due_endpoint.
        SELECT count(*) AS due, min(x.next_attempt_at) AS oldest
        FROM public.claimable_endpoints(o.organisation_id, p_endpoint_room, p_busy_endpoints, p_busy_room) room
        CROSS JOIN LATERAL (
            SELECT d.next_attempt_at FROM public.deliveries d
            WHERE d.organisation_id = o.organisation_id AND d.endpoint_id = room.id
              AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at LIMIT least(room.room, p_limit)) x
        WHERE room.room > 0
    ) by_endpoint
    WHERE direct.due + by_endpoint.due > 0
    ORDER BY least(direct.oldest, by_endpoint.oldest)
    LIMIT p_limit;
    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION due_delivery_organisations(integer, integer, uuid[], integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION due_delivery_organisations(integer, integer, uuid[], integer[]) TO herald_worker;
