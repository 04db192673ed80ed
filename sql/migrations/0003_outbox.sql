-- The outbox's delivery path: leases, fencing, the attempt log, and the one narrow function
-- through which workers claim deliveries across organisations.

ALTER TABLE deliveries
    ADD COLUMN lease_owner        text,
    ADD COLUMN lease_expires_at   timestamptz,
    ADD COLUMN max_attempts       integer NOT NULL DEFAULT 8 CHECK (max_attempts BETWEEN 1 AND 100),
    ADD COLUMN last_response_code integer,
    ADD COLUMN sent_at            timestamptz;

-- Every attempt, whatever its outcome. (delivery, attempt) is the primary key, so a second
-- claim of the same attempt cannot be logged: the log proves one claim per row per attempt.
CREATE TABLE delivery_attempts (
    organisation_id uuid NOT NULL,
    delivery_id     uuid NOT NULL,
    attempt         integer NOT NULL,
    worker          text NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL CHECK (outcome IN ('SENT', 'FAILED', 'DEAD', 'FENCED')),
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
-- claim_deliveries() alone: SECURITY DEFINER, run as the owner, through an owner-only policy on
-- deliveries; it returns only (organisation, id, attempt). Everything else a worker does with
-- the row (rendering, sending, completing) runs in a tenant transaction with the context set.
CREATE POLICY owner_claims ON deliveries FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);

-- The claim index is global on purpose: due work is found across organisations.
-- FAILED means "the last attempt failed; the next one is scheduled at next_attempt_at".
CREATE INDEX deliveries_claim ON deliveries (next_attempt_at) WHERE status IN ('PENDING', 'FAILED');
CREATE INDEX deliveries_lease_claim ON deliveries (lease_expires_at) WHERE status = 'SENDING';

-- p_organisation, when given, confines a claim to one organisation (per-tenant workers, tests).
CREATE FUNCTION claim_deliveries(p_worker text, p_limit integer, p_lease_seconds integer, p_organisation uuid DEFAULT NULL)
    RETURNS TABLE (organisation_id uuid, delivery_id uuid, attempt integer)
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public
AS $$
    WITH due AS (
        SELECT d.organisation_id, d.id FROM public.deliveries d
        WHERE ((d.status IN ('PENDING', 'FAILED') AND d.next_attempt_at <= now())
               OR (d.status = 'SENDING' AND d.lease_expires_at < now()))   -- a crashed worker's rows
          AND (p_organisation IS NULL OR d.organisation_id = p_organisation)
        ORDER BY d.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE public.deliveries d
    SET status = 'SENDING', attempts = d.attempts + 1, lease_owner = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    FROM due WHERE d.organisation_id = due.organisation_id AND d.id = due.id
    RETURNING d.organisation_id, d.id, d.attempts
$$;
REVOKE ALL ON FUNCTION claim_deliveries(text, integer, integer, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_deliveries(text, integer, integer, uuid) TO herald_app, herald_worker;
