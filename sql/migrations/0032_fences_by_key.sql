-- Issue 12 (delivery's cost per message). Two costs of every attempt that grew with the queue,
-- not with the attempt.
--
-- 1. The fence walked the leases. complete_deliveries (0020) updates each attempt's row by key,
--    fenced by "status = 'SENDING'". That condition implies the predicate of the partial index
--    deliveries_lease_claim (lease_expires_at) WHERE status = 'SENDING', and once PL/pgSQL had
--    cached a generic plan, PostgreSQL costed a scan of that index (every row in flight, and every
--    entry claims left there until vacuum) no higher than the primary key and took it: for each
--    attempt it read every lease in flight. With 10 000 rows in flight, recording 10 000 attempts
--    took 17 s instead of 1.1 s (`psql`, one transaction). The fence is now written
--    "(status = 'SENDING') IS TRUE", which means the same for a NOT NULL column but proves no index
--    predicate, so the row is found by its key. The server's fenced statements by key (digest
--    runs, jobs, schedules, fan-outs) are written the same way (docs/decisions.md).
--
-- 2. Give-backs and heartbeats read the whole organisation. They were one set-based UPDATE …
--    FROM unnest(ids) each. With statistics that do not know the organisation yet (a fan-out
--    to a million just wrote its rows), PostgreSQL estimated a handful of its rows and, rather
--    than look each id up, read all of them through deliveries_created and joined (EXPLAIN
--    ANALYZE on the test database: 380 rows read to give back 5). release_deliveries and
--    extend_leases below update one row by key at a time in a loop, as complete_deliveries does.
--
-- 3. Every attempt row was written into two btrees, its primary key (organisation_id,
--    delivery_id, attempt) and delivery_attempts_delivery (organisation_id, delivery_id), which
--    0013 added for retention's deletes by delivery. The primary key begins with the same two
--    columns and serves those lookups, and the foreign key's cascade from deliveries, as well.
DROP INDEX delivery_attempts_delivery;

CREATE OR REPLACE FUNCTION complete_deliveries(p_worker text, p_attempts jsonb)
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
          AND (d.status = 'SENDING') IS TRUE -- by key, never by deliveries_lease_claim (above)
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

-- Gives claimed deliveries back without counting an attempt, due again at p_until[i]; fenced like
-- completion. Returns the positions (from 0) of those given back. Runs in the caller's tenant
-- transaction.
CREATE FUNCTION release_deliveries(p_worker text, p_ids uuid[], p_attempts integer[], p_until timestamptz[])
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
            next_attempt_at = p_until[i], lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE d.organisation_id = org AND d.id = p_ids[i] AND d.lease_owner = p_worker AND d.attempts = p_attempts[i]
          AND (d.status = 'SENDING') IS TRUE;
        IF FOUND THEN
            RETURN NEXT i - 1;
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION release_deliveries(text, uuid[], integer[], timestamptz[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION release_deliveries(text, uuid[], integer[], timestamptz[]) TO herald_worker, herald_app;

-- The heartbeat: extends the leases p_worker still holds on the rows p_ids (at the attempts
-- p_attempts) of a leased table, fenced like completion; returns how many it extended. One
-- statement per row, planned for its key (the table is a parameter; a heartbeat every third of
-- a lease is no hot path). The owner, and what a held row says of itself, are written
-- "(…) IS TRUE", so that neither proves a lease index's predicate (schedules_lease_claim's is
-- "lease_owner IS NOT NULL", which a plain "lease_owner = …" implies).
CREATE FUNCTION extend_leases(p_table text, p_worker text, p_ids uuid[], p_attempts integer[], p_lease_seconds integer)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    held text := CASE p_table
        WHEN 'deliveries' THEN '(status = ''SENDING'') IS TRUE'
        WHEN 'digest_runs' THEN '(status = ''SENDING'') IS TRUE'
        WHEN 'jobs' THEN '(status = ''RUNNING'') IS TRUE'
        WHEN 'schedules' THEN 'true' END;
    extended integer := 0;
    touched integer;
BEGIN
    IF org IS NULL THEN
        RAISE EXCEPTION 'extend_leases: runs in a tenant transaction';
    END IF;
    IF held IS NULL THEN
        RAISE EXCEPTION 'extend_leases: % is not a leased table', p_table;
    END IF;
    IF cardinality(p_attempts) <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'extend_leases: one attempt per id';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        EXECUTE format(
            'UPDATE public.%I SET lease_expires_at = now() + make_interval(secs => $1) '
            'WHERE organisation_id = $2 AND id = $3 AND attempts = $4 AND (lease_owner = $5) IS TRUE AND %s',
            p_table, held)
        USING p_lease_seconds, org, p_ids[i], p_attempts[i], p_worker;
        GET DIAGNOSTICS touched = ROW_COUNT;
        extended := extended + touched;
    END LOOP;
    RETURN extended;
END
$$;
REVOKE ALL ON FUNCTION extend_leases(text, text, uuid[], integer[], integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION extend_leases(text, text, uuid[], integer[], integer) TO herald_worker, herald_app;
