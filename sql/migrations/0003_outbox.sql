-- The outbox's delivery path: leases, fencing, the attempt log, and the one narrow function
-- through which workers claim deliveries across organisations.

ALTER TABLE deliveries
    ADD COLUMN lease_owner        text,
    ADD COLUMN lease_expires_at   timestamptz,
    ADD COLUMN max_attempts       integer NOT NULL DEFAULT 8 CHECK (max_attempts BETWEEN 1 AND 100),
    ADD COLUMN last_response_code integer,
    ADD COLUMN sent_at            timestamptz;

-- Every attempt, whatever its outcome: SENT, FAILED (retry scheduled), DEAD (no attempt left),
-- EXPIRED (the worker's lease ran out; logged by the claim that rescued the row) or FENCED (a late
-- worker's result, refused). (delivery, attempt) is the primary key.
CREATE TABLE delivery_attempts (
    organisation_id uuid NOT NULL,
    delivery_id     uuid NOT NULL,
    attempt         integer NOT NULL,
    worker          text NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL CHECK (outcome IN ('SENT', 'FAILED', 'DEAD', 'FENCED', 'EXPIRED')),
    response_code   integer,
    error           text,
    PRIMARY KEY (organisation_id, delivery_id, attempt),
    FOREIGN KEY (organisation_id, delivery_id) REFERENCES deliveries (organisation_id, id) ON DELETE CASCADE
);
ALTER TABLE delivery_attempts ENABLE ROW LEVEL SECURITY;
ALTER TABLE delivery_attempts FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON delivery_attempts
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT ON delivery_attempts TO herald_app;

-- Claiming crosses organisations, so it cannot lean on the tenant policy. It goes through
-- claim_deliveries() alone: SECURITY DEFINER, run as the owner, through owner-only policies
-- that hold only while the function runs (it sets herald.claiming for its own duration), and it
-- returns only (organisation, id, attempt). Everything else a worker does with the row
-- (rendering, sending, completing) runs in a tenant transaction with the context set. Only the
-- worker role may call it; the API server's role may not. (herald.claiming is switched on at the
-- start of the function and off before it returns; a custom setting cannot be a SET clause of
-- a function without superuser rights.)
CREATE POLICY owner_claims_read ON deliveries FOR SELECT TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on');
CREATE POLICY owner_claims_update ON deliveries FOR UPDATE TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');
CREATE POLICY owner_claims_log ON delivery_attempts FOR INSERT TO CURRENT_USER
    WITH CHECK (current_setting('herald.claiming', true) = 'on');

-- The claim indexes are global on purpose: due work is found across organisations.
-- FAILED means "the last attempt failed; the next one is scheduled at next_attempt_at".
CREATE INDEX deliveries_claim ON deliveries (next_attempt_at) WHERE status IN ('PENDING', 'FAILED');
CREATE INDEX deliveries_lease_claim ON deliveries (lease_expires_at) WHERE status = 'SENDING';

-- First, rows whose lease expired (their worker crashed or stalled): the lost attempt is logged
-- as EXPIRED, and the row goes back in the queue now, or DEAD when no attempt is left. Then up to
-- p_limit due rows are leased to p_worker. p_organisation, when given, confines the claim to one
-- organisation (per-tenant workers, tests).
CREATE FUNCTION claim_deliveries(p_worker text, p_limit integer, p_lease_seconds integer, p_organisation uuid DEFAULT NULL)
    RETURNS TABLE (organisation_id uuid, delivery_id uuid, attempt integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_deliveries: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'claim_deliveries: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);

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

    RETURN QUERY
    WITH due AS (
        SELECT d.organisation_id, d.id FROM public.deliveries d
        WHERE d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now()
          AND (p_organisation IS NULL OR d.organisation_id = p_organisation)
        ORDER BY d.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE public.deliveries d
    SET status = 'SENDING', attempts = d.attempts + 1, lease_owner = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    FROM due WHERE d.organisation_id = due.organisation_id AND d.id = due.id
    RETURNING d.organisation_id, d.id, d.attempts;

    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION claim_deliveries(text, integer, integer, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_deliveries(text, integer, integer, uuid) TO herald_worker;

-- The worker role works in tenant transactions like the API: it reads and completes deliveries
-- and logs attempts under the tenant policy.
GRANT USAGE ON SCHEMA public TO herald_worker;
GRANT SELECT, UPDATE ON deliveries TO herald_worker;
GRANT SELECT, INSERT ON delivery_attempts TO herald_worker;
