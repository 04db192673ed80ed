-- The outbox's backlog age counts from when a row first came due, not from its last give-back
-- (a trial: GET /v1/deliveries/stats said 6 s, or nothing, while 78 rows had waited 56 s behind a
-- slow endpoint). A worker gives a claimed row back unsent when its endpoint's send slots are full
-- or its circuit is open, due again a few seconds later: next_attempt_at moved on each time, and
-- oldest_pending_age_seconds, which read min(next_attempt_at) of the rows due, no longer saw them.
--
-- waiting_since keeps the time the row was due when it was first given back (its next_attempt_at
-- then: a claim leaves it alone), until an attempt is recorded for it. It is NULL for every row
-- not given back since its last attempt, and indexed by nothing (a give-back stays as cheap).
ALTER TABLE deliveries ADD COLUMN waiting_since timestamptz;

-- release_deliveries (0032), and the row's first due time kept.
CREATE OR REPLACE FUNCTION release_deliveries(p_worker text, p_ids uuid[], p_attempts integer[], p_until timestamptz[])
    RETURNS SETOF integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
BEGIN
    IF org IS NULL THEN
        RAISE EXCEPTION 'release_deliveries: runs in a tenant transaction';
    END IF;
    IF cardinality(p_attempts) <> cardinality(p_ids) OR cardinality(p_until) <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'release_deliveries: one attempt and one time per id';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        UPDATE public.deliveries d
        SET status = CASE WHEN d.attempts <= 1 THEN 'PENDING' ELSE 'FAILED' END, attempts = d.attempts - 1,
            waiting_since = coalesce(d.waiting_since, d.next_attempt_at),
            next_attempt_at = p_until[i], lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE d.organisation_id = org AND d.id = p_ids[i] AND d.lease_owner = p_worker AND d.attempts = p_attempts[i]
          AND (d.status = 'SENDING') IS TRUE;
        IF FOUND THEN
            RETURN NEXT i - 1;
        END IF;
    END LOOP;
END
$$;

-- complete_deliveries (0044), and the wait over once an attempt is recorded.
CREATE OR REPLACE FUNCTION complete_deliveries(p_worker text, p_attempts jsonb)
    RETURNS SETOF integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, public
    SET enable_hashjoin = off
    SET enable_mergejoin = off
    SET enable_seqscan = off
    SET enable_bitmapscan = off
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    ids uuid[] := ARRAY(SELECT (e ->> 'id')::uuid FROM jsonb_array_elements(p_attempts) e);
BEGIN
    IF org IS NULL THEN
        RAISE EXCEPTION 'complete_deliveries: runs in a tenant transaction';
    END IF;
    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT * FROM jsonb_to_recordset(p_attempts) AS i (
            position int, id uuid, attempt int, status text, code int, error text, retry_at double precision,
            response text, started_at double precision)
        ORDER BY position
    ), updated AS (
        UPDATE public.deliveries d SET
            status = CASE WHEN a.status = 'FAILED' AND d.attempts >= d.max_attempts THEN 'DEAD' ELSE a.status END,
            last_response_code = a.code, last_error = a.error, last_response = a.response,
            next_attempt_at = coalesce(to_timestamp(a.retry_at), d.next_attempt_at), lease_owner = NULL, lease_expires_at = NULL,
            waiting_since = NULL,
            sent_at = CASE WHEN a.status = 'SENT' THEN now() ELSE d.sent_at END, updated_at = now()
        FROM input a
        WHERE d.organisation_id = org AND d.id = ANY (ids) AND d.id = a.id AND d.lease_owner = p_worker AND d.attempts = a.attempt
          AND (d.status = 'SENDING') IS TRUE
        RETURNING a.position, d.status AS final
    ), logged AS (
        INSERT INTO public.delivery_attempts (organisation_id, delivery_id, attempt, worker, started_at, outcome, response_code, error)
        SELECT org, a.id, a.attempt, p_worker, to_timestamp(a.started_at), coalesce(u.final, 'FENCED'), a.code, a.error
        FROM input a LEFT JOIN updated u ON u.position = a.position
        ORDER BY a.position
        ON CONFLICT DO NOTHING
    )
    SELECT u.position FROM updated u;
END
$$;
