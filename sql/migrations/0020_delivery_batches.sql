-- Claiming and completing deliveries in batches (issue 12: one worker delivered webhooks at 0.04
-- of the receiver's own rate).
--
-- 1. The claim follows its index. claim_deliveries() takes the oldest due rows LIMIT n through
--    deliveries_claim (next_attempt_at, partial on PENDING/FAILED). A burst of new rows comes
--    before autoanalyze sees it, so the planner believes a handful are due and picks a bitmap
--    scan: every due row read and sorted to take 32. Measured on the bench database with 8 720
--    due rows: 6-10 ms per claim of 32, against 1.1-2 ms walking the index in order and
--    stopping at the 32nd row it locks; the bench's worker spent half of PostgreSQL's time in
--    claims. Walking the index in order is right at any size, so the function forbids the
--    bitmap scan for its statements (the rescue of expired leases then walks its own index).
ALTER FUNCTION claim_deliveries(text, integer, integer, uuid) SET enable_bitmapscan = off;

-- 2. Recording attempts in one round trip whose plans stay cached. A set-based statement had to
--    be planned on every call (1.4 ms of its 2.2 ms), and as a cached plan it met the same stale
--    statistics as the claim: the planner, believing few rows were SENDING, read every SENDING
--    row of the organisation through two bitmap indexes to update ten (3-5 ms). So each attempt
--    is one UPDATE by primary key and one INSERT, statements whose plan cannot go wrong, in a
--    PL/pgSQL loop: their plans are kept for the connection, also behind a pooler in
--    transaction mode (where the client's named prepared statements break). The function runs
--    as the caller, in the caller's tenant transaction, so the tenant policy applies as to any
--    statement of the worker.
--
--    p_attempts: [{position, id, attempt, status, code, error, retry_at, response, started_at}],
--    times as seconds since 1970. Each attempt is fenced on (worker, attempt, SENDING) and
--    logged once: with the row's final status (a FAILED on the last allowed attempt is DEAD), or
--    FENCED when the fence refused (unless the rescuing claim logged it EXPIRED already).
--    Returns the positions that were recorded.
CREATE FUNCTION complete_deliveries(p_worker text, p_attempts jsonb)
    RETURNS SETOF integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    a record;
    final text;
BEGIN
    IF org IS NULL THEN
        RAISE EXCEPTION 'complete_deliveries: runs in a tenant transaction';
    END IF;
    FOR a IN
        SELECT * FROM jsonb_to_recordset(p_attempts) AS i (
            position int, id uuid, attempt int, status text, code int, error text, retry_at double precision,
            response text, started_at double precision)
    LOOP
        UPDATE public.deliveries d SET
            status = CASE WHEN a.status = 'FAILED' AND d.attempts >= d.max_attempts THEN 'DEAD' ELSE a.status END,
            last_response_code = a.code, last_error = a.error, last_response = a.response,
            next_attempt_at = coalesce(to_timestamp(a.retry_at), d.next_attempt_at), lease_owner = NULL, lease_expires_at = NULL,
            sent_at = CASE WHEN a.status = 'SENT' THEN now() ELSE d.sent_at END, updated_at = now()
        WHERE d.organisation_id = org AND d.id = a.id AND d.lease_owner = p_worker AND d.attempts = a.attempt
          AND d.status = 'SENDING'
        RETURNING d.status INTO final;
        IF FOUND THEN
            INSERT INTO public.delivery_attempts (organisation_id, delivery_id, attempt, worker, started_at, outcome, response_code, error)
            VALUES (org, a.id, a.attempt, p_worker, to_timestamp(a.started_at), final, a.code, a.error);
            RETURN NEXT a.position;
        ELSE
            INSERT INTO public.delivery_attempts (organisation_id, delivery_id, attempt, worker, started_at, outcome, response_code, error)
            VALUES (org, a.id, a.attempt, p_worker, to_timestamp(a.started_at), 'FENCED', a.code, a.error)
            ON CONFLICT DO NOTHING;
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION complete_deliveries(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION complete_deliveries(text, jsonb) TO herald_worker, herald_app;
