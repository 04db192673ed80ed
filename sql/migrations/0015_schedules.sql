-- Recurring schedules for integrators (issue 11): a notification type, audience and payload sent
-- on a rhythm (a documented subset of RFC 5545 RRULE, in a time zone). Each occurrence is one
-- notify, with the idempotency key schedule:<id>:<occurrence>, in the same transaction that
-- moves the schedule to its next occurrence: two instances or a crash never send an occurrence
-- twice, and a crash before the commit sends it at the next claim.
--
-- claim_schedules() leases due schedules across organisations (SECURITY DEFINER, like the
-- other claims); the API server's role runs them, because an occurrence is a notify and notify
-- writes as the application role.

CREATE TABLE schedules (
    organisation_id  uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id               uuid NOT NULL,
    name             text NOT NULL CONSTRAINT schedules_name_valid CHECK (length(name) BETWEEN 1 AND 200),
    type_id          uuid NOT NULL,
    -- The event each occurrence sends (an engine request without its times), as JSON.
    event            jsonb NOT NULL,
    rule             text NOT NULL,
    time_zone        text NOT NULL,
    starts_at        timestamptz NOT NULL,
    paused           boolean NOT NULL DEFAULT false,
    -- The next occurrence; NULL once the rule has none left (COUNT or UNTIL reached).
    next_at          timestamptz,
    sent             integer NOT NULL DEFAULT 0,
    skipped          integer NOT NULL DEFAULT 0,
    last_at          timestamptz,
    last_event_id    uuid,
    last_error       text,
    failures         integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_pkey PRIMARY KEY (organisation_id, id),
    CONSTRAINT schedules_type_id_fk FOREIGN KEY (organisation_id, type_id) REFERENCES notification_types (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX schedules_time ON schedules (organisation_id, created_at DESC, id DESC);
CREATE INDEX schedules_type ON schedules (organisation_id, type_id);
-- Global claim indexes: due schedules are found across organisations.
CREATE INDEX schedules_claim ON schedules (next_at) WHERE NOT paused AND next_at IS NOT NULL AND lease_owner IS NULL;
CREATE INDEX schedules_lease_claim ON schedules (lease_expires_at) WHERE lease_owner IS NOT NULL;

ALTER TABLE schedules ENABLE ROW LEVEL SECURITY;
ALTER TABLE schedules FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON schedules
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
CREATE POLICY owner_claims ON schedules TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');
GRANT SELECT, INSERT, UPDATE, DELETE ON schedules TO herald_app;

-- Frees schedules whose lease expired, then leases up to p_limit schedules whose next occurrence
-- is due by p_now (tests pass a controlled clock; leases run on the database's).
CREATE FUNCTION claim_schedules(p_worker text, p_limit integer, p_lease_seconds integer, p_now timestamptz DEFAULT now(),
                                p_organisation uuid DEFAULT NULL)
    RETURNS TABLE (organisation_id uuid, schedule_id uuid, attempt integer, occurrence timestamptz)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_schedules: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 OR p_now IS NULL THEN
        RAISE EXCEPTION 'claim_schedules: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);

    UPDATE public.schedules s SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE s.lease_owner IS NOT NULL AND s.lease_expires_at < now()
      AND (p_organisation IS NULL OR s.organisation_id = p_organisation);

    RETURN QUERY
    WITH due AS (
        SELECT s.organisation_id, s.id FROM public.schedules s
        WHERE NOT s.paused AND s.next_at IS NOT NULL AND s.lease_owner IS NULL AND s.next_at <= p_now
          AND (p_organisation IS NULL OR s.organisation_id = p_organisation)
        ORDER BY s.next_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE public.schedules s
    SET attempts = s.attempts + 1, lease_owner = p_worker, lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        updated_at = now()
    FROM due WHERE s.organisation_id = due.organisation_id AND s.id = due.id
    RETURNING s.organisation_id, s.id, s.attempts, s.next_at;

    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION claim_schedules(text, integer, integer, timestamptz, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_schedules(text, integer, integer, timestamptz, uuid) TO herald_app;
