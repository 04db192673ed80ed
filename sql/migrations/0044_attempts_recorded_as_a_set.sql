-- Issue 12 (delivery's cost per message): the attempts of a recording written by two statements,
-- not two per attempt.
--
-- complete_deliveries (0020, 0032) updated and logged each attempt with its own UPDATE and
-- INSERT, in a PL/pgSQL loop: two statements' start-up and RLS checks per attempt, the largest
-- statement of the delivery bench (record_delivery_attempts, 1.49 s of PostgreSQL's 2.6 s over
-- 10 000 emails). Replaying the same batches in psql as the worker role (10 000 attempts,
-- batches of 32, alternated twice): 570 and 587 ms in the loop, 310 and 309 ms as below.
--
-- The fence and the outcomes are unchanged: one UPDATE of the batch's rows by key, fenced by
-- (lease owner, attempt, SENDING); one INSERT of an attempt row for each attempt, with the row's
-- final status, or FENCED where the fence refused (a row the rescuing claim logged EXPIRED is
-- kept). The positions of the recorded attempts are returned, in no particular order (the caller
-- reads them as a set). One difference: ON CONFLICT DO NOTHING now covers a recorded attempt too,
-- whose row the loop inserted without it. Its key (delivery, attempt) can only exist already if
-- the fence passed for an attempt that was logged before, which the fence rules out; had it
-- happened, the loop failed the whole recording, and this records it without a second row.
--
-- 0032 found a set-based UPDATE … FROM reading a whole organisation through deliveries_created
-- when the statistics did not know it yet, and a first form of this one, joined to the batch
-- alone, read the organisation's rows through the primary key under a generic plan (200 index
-- entries for 15 attempts in PlanGuardTests.fencesFindRowsByKey). The rows are named by their
-- keys instead ("id = ANY (the batch's ids)", an index condition of the primary key), and hash
-- and merge joins, bitmap and sequential scans are off for this function; the fence stays written
-- "(status = 'SENDING') IS TRUE" so that it proves no lease index's predicate.
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
