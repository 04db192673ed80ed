-- Scheduled jobs and retention (issue 11). Until now `herald purge-expired` had to be run from
-- cron and nothing was ever deleted.
--
-- A job belongs to an organisation (so the tenant policy confines it like every other row):
-- each organisation has Herald's system jobs (`retention`, `purge-expired`), made when the
-- organisation is made and by `herald migrate` for those that exist, each with a schedule:
-- a five-field cron expression in a time zone (NULL: the organisation's), or an interval.
--
-- Each due run is claimed by one instance, however many run: claim_jobs() leases the job
-- (status RUNNING, attempts + 1 as the fence) and writes its run row in the same statement.
-- Completion is fenced on (worker, attempt), records the run's status, duration, counts and
-- error, and sets the next run (computed in Swift from the schedule, after the run's start).
-- A lease that expires (the process died) ends its run ABANDONED and leaves the job due: the
-- next claim runs it again (every job is idempotent). A run asked for by hand
-- (POST /v1/jobs/{id}/run, `herald jobs run`) sets run_requested_at; it runs at the next claim,
-- even for a paused job, and leaves the schedule as it was.

ALTER TABLE organisations
    ADD COLUMN retention_days integer NOT NULL DEFAULT 90
        CONSTRAINT organisations_retention_days_valid CHECK (retention_days BETWEEN 1 AND 3650);

CREATE TABLE jobs (
    organisation_id  uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    name             text NOT NULL,
    cron             text,
    time_zone        text,
    interval_seconds integer,
    paused           boolean NOT NULL DEFAULT false,
    next_run_at      timestamptz NOT NULL,
    run_requested_at timestamptz,
    status           text NOT NULL DEFAULT 'IDLE',
    attempts         integer NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz,
    last_run_id      uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_pkey PRIMARY KEY (organisation_id, id),
    CONSTRAINT jobs_name_unique UNIQUE (organisation_id, name),
    CONSTRAINT jobs_name_valid CHECK (name IN ('retention', 'purge-expired')),
    CONSTRAINT jobs_schedule_valid CHECK ((cron IS NULL) <> (interval_seconds IS NULL)),
    CONSTRAINT jobs_interval_valid CHECK (interval_seconds IS NULL OR interval_seconds >= 60),
    CONSTRAINT jobs_status_valid CHECK (status IN ('IDLE', 'RUNNING'))
);
-- Global claim indexes, as the outbox's: due jobs are found across organisations.
CREATE INDEX jobs_claim ON jobs (next_run_at) WHERE status = 'IDLE' AND NOT paused;
CREATE INDEX jobs_requested_claim ON jobs (run_requested_at) WHERE status = 'IDLE' AND run_requested_at IS NOT NULL;
CREATE INDEX jobs_lease_claim ON jobs (lease_expires_at) WHERE status = 'RUNNING';

CREATE TABLE job_runs (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL,
    job_id          uuid NOT NULL,
    -- SCHEDULE: its time had come; MANUAL: asked for through the API or the CLI.
    trigger         text NOT NULL,
    scheduled_for   timestamptz NOT NULL,
    attempt         integer NOT NULL,
    worker          text NOT NULL,
    -- RUNNING, SUCCEEDED, FAILED (the job reported an error), ABANDONED (its lease expired).
    status          text NOT NULL DEFAULT 'RUNNING',
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    duration_ms     bigint,
    counts          jsonb NOT NULL DEFAULT '{}'::jsonb,
    error           text,
    CONSTRAINT job_runs_pkey PRIMARY KEY (organisation_id, id),
    CONSTRAINT job_runs_job_id_fk FOREIGN KEY (organisation_id, job_id) REFERENCES jobs (organisation_id, id) ON DELETE CASCADE,
    CONSTRAINT job_runs_trigger_valid CHECK (trigger IN ('SCHEDULE', 'MANUAL')),
    CONSTRAINT job_runs_status_valid CHECK (status IN ('RUNNING', 'SUCCEEDED', 'FAILED', 'ABANDONED'))
);
CREATE INDEX job_runs_job ON job_runs (organisation_id, job_id, started_at DESC, id DESC);

ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE jobs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON jobs
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
ALTER TABLE job_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_runs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON job_runs
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
-- The claim crosses organisations, through owner-only policies that hold while claim_jobs()
-- runs (it alone switches herald.claiming on, for its own duration).
CREATE POLICY owner_claims ON jobs TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');
CREATE POLICY owner_claims ON job_runs TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');
-- (The owner reads every organisation already: owner_resolves_slug, 0001.)

-- The API reads jobs and their runs and asks for a run; organisations are made with their jobs.
GRANT SELECT, INSERT, UPDATE ON jobs TO herald_app;
GRANT SELECT ON job_runs TO herald_app;
-- Workers complete runs, and retention deletes in bounded batches under the tenant policy.
GRANT SELECT, INSERT, UPDATE ON jobs TO herald_worker;
GRANT SELECT, UPDATE, DELETE ON job_runs TO herald_worker;
GRANT SELECT, DELETE ON events, notifications, deliveries, delivery_attempts, link_clicks, digest_items, digest_runs,
    event_recipients TO herald_worker;

-- Retention walks an organisation's old events by time and deletes their rows by event.
CREATE INDEX digest_runs_slot ON digest_runs (organisation_id, slot_at);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (organisation_id, delivery_id);

-- Puts jobs whose lease expired back (their run ABANDONED), then leases up to p_limit due jobs
-- to p_worker, each with a new run row. p_now is the clock of due times (tests pass a controlled
-- one); leases run on the database clock. p_organisation and p_name confine it (tests, and
-- `herald jobs run NAME`). Returns what running and rescheduling the job needs.
CREATE FUNCTION claim_jobs(p_worker text, p_limit integer, p_lease_seconds integer, p_now timestamptz DEFAULT now(),
                           p_organisation uuid DEFAULT NULL, p_name text DEFAULT NULL)
    RETURNS TABLE (organisation_id uuid, job_id uuid, run_id uuid, name text, attempt integer, trigger text,
                   scheduled_for timestamptz, cron text, time_zone text, interval_seconds integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_jobs: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 OR p_now IS NULL THEN
        RAISE EXCEPTION 'claim_jobs: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);

    WITH expired AS (
        UPDATE public.jobs j SET status = 'IDLE', lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
        WHERE j.status = 'RUNNING' AND j.lease_expires_at < now()
          AND (p_organisation IS NULL OR j.organisation_id = p_organisation)
        RETURNING j.organisation_id, j.last_run_id
    )
    UPDATE public.job_runs r
    SET status = 'ABANDONED', finished_at = now(), error = 'lease expired: the worker stopped before finishing'
    FROM expired e
    WHERE r.organisation_id = e.organisation_id AND r.id = e.last_run_id AND r.status = 'RUNNING';

    RETURN QUERY
    WITH due AS (
        SELECT j.organisation_id, j.id, j.run_requested_at, j.next_run_at FROM public.jobs j
        WHERE j.status = 'IDLE' AND (j.run_requested_at IS NOT NULL OR (NOT j.paused AND j.next_run_at <= p_now))
          AND (p_organisation IS NULL OR j.organisation_id = p_organisation)
          AND (p_name IS NULL OR j.name = p_name)
        ORDER BY coalesce(j.run_requested_at, j.next_run_at)
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    leased AS (
        UPDATE public.jobs j
        SET status = 'RUNNING', attempts = j.attempts + 1, lease_owner = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_seconds), last_run_id = gen_random_uuid(),
            run_requested_at = NULL, updated_at = now()
        FROM due WHERE j.organisation_id = due.organisation_id AND j.id = due.id
        RETURNING j.organisation_id, j.id, j.last_run_id, j.name, j.attempts, j.cron, j.time_zone, j.interval_seconds,
                  CASE WHEN due.run_requested_at IS NOT NULL THEN 'MANUAL' ELSE 'SCHEDULE' END AS trigger,
                  coalesce(due.run_requested_at, due.next_run_at) AS scheduled_for
    ),
    runs AS (
        INSERT INTO public.job_runs (organisation_id, id, job_id, trigger, scheduled_for, attempt, worker)
        SELECT l.organisation_id, l.last_run_id, l.id, l.trigger, l.scheduled_for, l.attempts, p_worker FROM leased l
    )
    SELECT l.organisation_id, l.id, l.last_run_id, l.name, l.attempts, l.trigger, l.scheduled_for, l.cron,
           coalesce(l.time_zone, o.default_timezone), l.interval_seconds
    FROM leased l JOIN public.organisations o ON o.id = l.organisation_id;

    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION claim_jobs(text, integer, integer, timestamptz, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_jobs(text, integer, integer, timestamptz, uuid, text) TO herald_worker;
