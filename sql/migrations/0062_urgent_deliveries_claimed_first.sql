-- An event's priority decides which of its organisation's waiting deliveries go first. Until now
-- `priority` (low, normal, high, critical) was a label: stored, shown in the feed and the
-- webhook's body, and ignored by the outbox, so a critical alert queued behind a bulk
-- announcement's backlog waited for all of it (12 s in a platform trial, longer with a bigger
-- backlog).
--
-- A delivery of a high or critical event is urgent. A claim takes an organisation's urgent due
-- rows before its others, oldest first in each lane, within the same limits: each endpoint's room
-- in the claiming pool, the organisation's fair share of the claim. Low and normal share the
-- other lane. Fairness between organisations is unchanged: priority orders an organisation's own
-- rows, never one organisation's rows before another's.
--
-- The urgent rows have an index of their own besides their entry in 0059's two due indexes, so
-- a claim finds them without reading the backlog before them, and a notify of normal priority
-- writes no more index entries than before.
ALTER TABLE deliveries ADD COLUMN urgent boolean NOT NULL DEFAULT false;

CREATE INDEX deliveries_due_urgent_direct ON deliveries (organisation_id, next_attempt_at)
    WHERE status IN ('PENDING', 'FAILED') AND urgent AND endpoint_id IS NULL;
CREATE INDEX deliveries_due_urgent_endpoint ON deliveries (organisation_id, endpoint_id, next_attempt_at)
    WHERE status IN ('PENDING', 'FAILED') AND urgent AND endpoint_id IS NOT NULL;

-- Rows already waiting (or in flight, for their retries) take their event's priority. The owner
-- runs migrations without BYPASSRLS, so row-level security is lifted for the update and forced
-- again.
ALTER TABLE deliveries NO FORCE ROW LEVEL SECURITY;
ALTER TABLE events NO FORCE ROW LEVEL SECURITY;
UPDATE deliveries d SET urgent = true
FROM events e
WHERE e.organisation_id = d.organisation_id AND e.id = d.event_id
  AND e.priority IN ('high', 'critical') AND d.status IN ('PENDING', 'FAILED', 'SENDING');
ALTER TABLE events FORCE ROW LEVEL SECURITY;
ALTER TABLE deliveries FORCE ROW LEVEL SECURITY;

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
        -- Every organisation, urgent rows first, then by time (tests and callers without one): no
        -- endpoint's room applies.
        RETURN QUERY
        WITH due AS (
            SELECT d.organisation_id, d.id FROM public.deliveries d
            WHERE d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
            ORDER BY d.urgent DESC, d.next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE public.deliveries d
        SET status = 'SENDING', attempts = d.attempts + 1, lease_owner = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
        FROM due WHERE d.organisation_id = due.organisation_id AND d.id = due.id
        RETURNING d.organisation_id, d.id, d.attempts, d.endpoint_id;
    ELSE
        -- Each leg reads its urgent rows first (by their own index), then, only while it has room
        -- left, its others (0059's indexes, where the urgent rows are too: they are passed over).
        -- A leg's two parts are read in that order and no further than its limit, so a backlog
        -- behind an urgent row is not read to find it.
        RETURN QUERY
        WITH room AS MATERIALIZED (
            SELECT r.id, r.room FROM public.claimable_endpoints(p_organisation, p_endpoint_room, p_busy_endpoints, p_busy_room) r
        ), by_endpoint AS (
            -- Each endpoint's due rows, urgent first, as many as it has room for.
            SELECT x.id, x.urgent, x.next_attempt_at
            FROM room
            CROSS JOIN LATERAL (
                SELECT u.id, u.urgent, u.next_attempt_at FROM (
                    SELECT * FROM (
                        SELECT d.id, true AS urgent, d.next_attempt_at FROM public.deliveries d
                        WHERE d.organisation_id = p_organisation AND d.endpoint_id = room.id AND d.urgent
                          AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
                        ORDER BY d.next_attempt_at
                        LIMIT least(room.room, p_limit)
                        FOR UPDATE OF d SKIP LOCKED) urgent
                    UNION ALL
                    SELECT * FROM (
                        SELECT d.id, false AS urgent, d.next_attempt_at FROM public.deliveries d
                        WHERE d.organisation_id = p_organisation AND d.endpoint_id = room.id AND NOT d.urgent
                          AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
                        ORDER BY d.next_attempt_at
                        LIMIT least(room.room, p_limit)
                        FOR UPDATE OF d SKIP LOCKED) others
                ) u
                LIMIT least(room.room, p_limit)
            ) x
            WHERE room.room > 0
        ), direct AS (
            -- The rows without an endpoint (email), urgent first.
            SELECT u.id, u.urgent, u.next_attempt_at FROM (
                SELECT * FROM (
                    SELECT d.id, true AS urgent, d.next_attempt_at FROM public.deliveries d
                    WHERE d.organisation_id = p_organisation AND d.endpoint_id IS NULL AND d.urgent
                      AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
                    ORDER BY d.next_attempt_at
                    LIMIT p_limit
                    FOR UPDATE SKIP LOCKED) urgent
                UNION ALL
                SELECT * FROM (
                    SELECT d.id, false AS urgent, d.next_attempt_at FROM public.deliveries d
                    WHERE d.organisation_id = p_organisation AND d.endpoint_id IS NULL AND NOT d.urgent
                      AND d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
                    ORDER BY d.next_attempt_at
                    LIMIT p_limit
                    FOR UPDATE SKIP LOCKED) others
            ) u
            LIMIT p_limit
        ), due AS (
            SELECT c.id FROM (SELECT * FROM by_endpoint UNION ALL SELECT * FROM direct) c
            ORDER BY c.urgent DESC, c.next_attempt_at
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
