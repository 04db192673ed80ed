-- A platform trial's findings on a cancel during a hung receiver, and on a moved endpoint.
--
-- 1. A send under way when its event was cancelled, which the receiver did not answer, was
--    recorded FAILED and retried: its row came due again and again, and was taken as the
--    endpoint's half-open circuit trial, where it ended CANCELLED without a request, so the
--    breaker never closed and each trial moved its retry on by a cool-down (minutes of a healthy
--    receiver's deliveries held back). A failed send of a cancelled event now ends CANCELLED (its
--    attempt still logged FAILED, as it went); a worker also no longer takes a trial for a row it
--    will not send (DeliveryHandler).
-- 2. A row sent while its endpoint moved named the old URL after a retry went to the new one.
--    The worker now says where it sent, when the row names another URL, and the row keeps it.
--
-- The events lookup runs only for failed sends (CASE stops at the first branch that holds).
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
            response text, started_at double precision, destination text)
        ORDER BY position
    ), updated AS (
        UPDATE public.deliveries d SET
            -- A failed send of an event cancelled while it was under way is not retried.
            status = CASE
                WHEN a.status = 'FAILED' AND EXISTS (
                    SELECT 1 FROM public.events e WHERE e.organisation_id = org AND e.id = d.event_id AND e.status = 'CANCELLED')
                    THEN 'CANCELLED'
                WHEN a.status = 'FAILED' AND d.attempts >= d.max_attempts THEN 'DEAD'
                ELSE a.status END,
            destination = coalesce(a.destination, d.destination),
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
        -- The attempt as it went: a failed send stays FAILED in the log when its row ends CANCELLED.
        SELECT org, a.id, a.attempt, p_worker, to_timestamp(a.started_at),
               CASE WHEN u.final IS NULL THEN 'FENCED' WHEN u.final = 'CANCELLED' THEN a.status ELSE u.final END, a.code, a.error
        FROM input a LEFT JOIN updated u ON u.position = a.position
        ORDER BY a.position
        ON CONFLICT DO NOTHING
    )
    SELECT u.position FROM updated u;
END
$$;
