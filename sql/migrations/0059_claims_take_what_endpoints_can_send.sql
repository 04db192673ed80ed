-- Issue 12, a platform trial: a claim took rows its worker could not send. With the defaults (64
-- send slots, 8 per endpoint), an organisation whose large audience goes to one webhook endpoint
-- had 64 rows claimed at a time, 8 sent and 56 read, handed back ("endpoint busy") and claimed
-- again a few seconds later: 81 193 give-backs for 22 000 sends, each a claim, a read of five
-- joins and an update, while the endpoint's 8 slots were the limit all along. Behind a full
-- endpoint, the rows of other endpoints and the emails of the same organisation only got a turn
-- because the full endpoint's rows kept being pushed into the future.
--
-- A claim for one organisation now takes, for each of its endpoints, at most the sends that
-- endpoint has room for in the claiming process (its worker says which endpoints are busy and how
-- much room each has left; an endpoint whose circuit is open has none, a half-open one at most
-- one), and the rows without an endpoint (email) by themselves, then the oldest of those up to
-- the limit. A full endpoint's rows stay where they are, due, untouched, until it has room.
--
-- Each leg walks an index of its own, so neither reads the rows of the other: deliveries_due
-- becomes two partial indexes, one entry per due row as before (an email row in the first, a
-- webhook or chat row in the second), so a notify writes no more index entries than it did.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due_direct ON deliveries (organisation_id, next_attempt_at)
    WHERE status IN ('PENDING', 'FAILED') AND endpoint_id IS NULL;
CREATE INDEX deliveries_due_endpoint ON deliveries (organisation_id, endpoint_id, next_attempt_at)
    WHERE status IN ('PENDING', 'FAILED') AND endpoint_id IS NOT NULL;

-- The claim reads each endpoint's id and circuit, under an owner-only policy that holds only
-- while a claim runs (as 0003's on deliveries).
CREATE POLICY owner_claims_read ON endpoints FOR SELECT TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on');

-- The claim returns each row's endpoint: the worker counts what it holds per endpoint.
DROP FUNCTION claim_deliveries(text, integer, integer, uuid);
CREATE FUNCTION claim_deliveries(
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
    IF p_endpoint_room IS NULL OR p_endpoint_room < 0 OR cardinality(p_busy_endpoints) IS DISTINCT FROM cardinality(p_busy_room) THEN
        RAISE EXCEPTION 'claim_deliveries: an endpoint room of 0 or more, and one room per busy endpoint';
    END IF;
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
            -- Each endpoint's room in the claiming process: what its worker said for the busy
            -- ones, the whole per-endpoint limit for the others; none while its circuit is open,
            -- one while half-open (the trial).
            SELECT e.id,
                   CASE WHEN e.circuit_opened_at IS NOT NULL THEN least(1, r.room) ELSE r.room END AS room
            FROM public.endpoints e
            CROSS JOIN LATERAL (
                SELECT coalesce((SELECT b.room FROM unnest(p_busy_endpoints, p_busy_room) AS b (id, room) WHERE b.id = e.id LIMIT 1),
                                p_endpoint_room) AS room) r
            WHERE e.organisation_id = p_organisation
              AND (e.circuit_opened_at IS NULL OR e.circuit_retry_at IS NULL OR e.circuit_retry_at <= now())
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
REVOKE ALL ON FUNCTION claim_deliveries(text, integer, integer, uuid, integer, uuid[], integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_deliveries(text, integer, integer, uuid, integer, uuid[], integer[]) TO herald_worker;

-- The organisations with due rows (0023, off bitmap scans since 0038), over the two indexes: an
-- organisation is found by its first entry in either; its due count, up to the limit, adds the
-- two; its oldest due row is the oldest of the direct rows' first and each endpoint's first.
CREATE OR REPLACE FUNCTION due_delivery_organisations(p_limit integer)
    RETURNS TABLE (organisation_id uuid, due integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
    SET enable_bitmapscan = off
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'due_delivery_organisations: limit must be 1 to 1000';
    END IF;
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
        SELECT count(*) AS due FROM (
            SELECT 1 FROM public.deliveries d
            WHERE d.organisation_id = o.organisation_id AND d.endpoint_id IS NOT NULL
              AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            LIMIT p_limit) x
    ) by_endpoint
    CROSS JOIN LATERAL (
        SELECT min(f.next_attempt_at) AS oldest
        FROM public.endpoints e
        CROSS JOIN LATERAL (
            SELECT d.next_attempt_at FROM public.deliveries d
            WHERE d.organisation_id = o.organisation_id AND d.endpoint_id = e.id
              AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at LIMIT 1) f
        WHERE e.organisation_id = o.organisation_id AND by_endpoint.due > 0
    ) endpoint_oldest
    WHERE direct.due + by_endpoint.due > 0
    ORDER BY least(direct.oldest, endpoint_oldest.oldest)
    LIMIT p_limit;
    PERFORM set_config('herald.claiming', '', true);
END
$$;
