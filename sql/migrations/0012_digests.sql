-- Digests that are sent (issue 11). Until now a DAILY or WEEKLY preference wrote a digest item
-- and nothing ever sent it.
--
-- When: an organisation's digests go at a local hour (digest_hour, default 08:00) every day
-- (DAILY) or on one ISO weekday (digest_weekday, default 1 = Monday) for WEEKLY; a user may pick
-- their own hour and weekday. The local time is the user's time zone (else the organisation's).
-- Notify stamps each item with its slot (slot_at): the first slot after the item is due, computed
-- in Swift (DigestSchedule: a slot in a skipped hour moves to the next existing minute, a slot
-- in a repeated hour fires once).
--
-- Exactly once: a digest run is unique per (organisation, user, frequency, slot). Runs are made
-- by claim_digest_runs() for every slot that has come and has pending email items, and the
-- items are attached to the run (run_id) in the statement that makes it, which freezes it
-- (frozen_at): every attempt sends the same items under the same Message-ID. Items are marked
-- sent in the transaction that records the SMTP server's acceptance. An item committed after its
-- slot's run was made (its notify began before the slot and committed after) moves to the user's
-- next slot, so it goes in the next digest, never twice and never lost. (That move adds one day or week in local time, in SQL: PostgreSQL reads a local
-- time that a spring-forward skipped as one hour later, not as the transition minute, which only
-- matters for a slot inside the skipped hour.)
--
-- Leases, fences, retries and DEAD follow the outbox (0003): claim_digest_runs() rescues expired
-- leases, then leases due runs with SKIP LOCKED; completion is fenced on (worker, attempt).

ALTER TABLE organisations
    ADD COLUMN digest_hour smallint NOT NULL DEFAULT 8 CONSTRAINT organisations_digest_hour_valid CHECK (digest_hour BETWEEN 0 AND 23),
    ADD COLUMN digest_weekday smallint NOT NULL DEFAULT 1 CONSTRAINT organisations_digest_weekday_valid CHECK (digest_weekday BETWEEN 1 AND 7);

ALTER TABLE users
    ADD COLUMN digest_hour smallint CONSTRAINT users_digest_hour_valid CHECK (digest_hour BETWEEN 0 AND 23),
    ADD COLUMN digest_weekday smallint CONSTRAINT users_digest_weekday_valid CHECK (digest_weekday BETWEEN 1 AND 7);

CREATE TABLE digest_runs (
    organisation_id  uuid NOT NULL,
    id               uuid NOT NULL,
    user_id          uuid NOT NULL,
    frequency        text NOT NULL,
    slot_at          timestamptz NOT NULL,
    -- PENDING (made, not tried), SENDING (leased), FAILED (retry at next_attempt_at), SENT,
    -- DEAD (no attempt left, or nothing can be sent), EMPTY (every item dropped at send time).
    status           text NOT NULL DEFAULT 'PENDING',
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 8,
    next_attempt_at  timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    frozen_at        timestamptz,
    item_count       integer NOT NULL DEFAULT 0,
    last_error       text,
    last_response    text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT digest_runs_pkey PRIMARY KEY (organisation_id, id),
    CONSTRAINT digest_runs_slot_unique UNIQUE (organisation_id, user_id, frequency, slot_at),
    CONSTRAINT digest_runs_frequency_valid CHECK (frequency IN ('DAILY', 'WEEKLY')),
    CONSTRAINT digest_runs_status_valid CHECK (status IN ('PENDING', 'SENDING', 'FAILED', 'SENT', 'DEAD', 'EMPTY')),
    CONSTRAINT digest_runs_user_id_fk FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
-- Global claim indexes, as the outbox's: due runs are found across organisations.
CREATE INDEX digest_runs_claim ON digest_runs (next_attempt_at) WHERE status IN ('PENDING', 'FAILED');
CREATE INDEX digest_runs_lease_claim ON digest_runs (lease_expires_at) WHERE status = 'SENDING';

ALTER TABLE digest_items
    ADD COLUMN slot_at timestamptz,
    ADD COLUMN run_id uuid,
    -- Why an item attached to a run was left out of it at send time (event_cancelled,
    -- event_expired, preference_off): explain shows it.
    ADD COLUMN dropped_reason text,
    ADD CONSTRAINT digest_items_run_id_fk FOREIGN KEY (organisation_id, run_id) REFERENCES digest_runs (organisation_id, id) ON DELETE SET NULL (run_id);
-- Items written before this migration are due at once.
UPDATE digest_items SET slot_at = due_after WHERE slot_at IS NULL;
ALTER TABLE digest_items ALTER COLUMN slot_at SET NOT NULL;
CREATE INDEX digest_items_slot_claim ON digest_items (slot_at) WHERE run_id IS NULL AND sent_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX digest_items_run ON digest_items (organisation_id, run_id) WHERE run_id IS NOT NULL;

ALTER TABLE digest_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE digest_runs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON digest_runs
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
-- The claim crosses organisations like claim_deliveries(): owner-only policies that hold while
-- herald.claiming is on, which only claim_digest_runs() switches on for its own duration.
CREATE POLICY owner_claims ON digest_runs TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');
CREATE POLICY owner_claims ON digest_items TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');
CREATE POLICY owner_claims_read ON users FOR SELECT TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on');

GRANT SELECT ON digest_runs TO herald_app;
GRANT SELECT, UPDATE ON digest_runs TO herald_worker;
GRANT SELECT, UPDATE ON digest_items TO herald_worker;
GRANT SELECT ON preferences, preference_defaults TO herald_worker;

-- Moves items that missed their slot's run to the next slot, makes the runs of every slot that has
-- come (up to 1 000 a call, items attached), puts runs whose lease expired back (or DEAD when no attempt
-- is left), then leases up to p_limit due runs to p_worker. p_now is the clock of due times (tests
-- pass a controlled one); leases run on the database clock. p_organisation confines it to one
-- organisation (tests).
CREATE FUNCTION claim_digest_runs(p_worker text, p_limit integer, p_lease_seconds integer, p_now timestamptz DEFAULT now(),
                                  p_organisation uuid DEFAULT NULL, p_make boolean DEFAULT true)
    RETURNS TABLE (organisation_id uuid, run_id uuid, attempt integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_digest_runs: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 OR p_now IS NULL THEN
        RAISE EXCEPTION 'claim_digest_runs: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);

    -- p_make false: only lease (a worker makes runs about once per poll, not in every claim).
    IF p_make THEN
    -- Late items: their slot's run was frozen before they committed.
    UPDATE public.digest_items i
    SET slot_at = ((r.slot_at AT TIME ZONE z.zone) + CASE r.frequency WHEN 'DAILY' THEN interval '1 day' ELSE interval '7 days' END) AT TIME ZONE z.zone
    FROM public.digest_runs r,
         LATERAL (SELECT coalesce(u.timezone, o.default_timezone) AS zone
                  FROM public.users u JOIN public.organisations o ON o.id = u.organisation_id
                  WHERE u.organisation_id = r.organisation_id AND u.id = r.user_id) z
    WHERE i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.channel = 'email' AND i.slot_at <= p_now
      AND (p_organisation IS NULL OR i.organisation_id = p_organisation)
      AND r.organisation_id = i.organisation_id AND r.user_id = i.user_id AND r.frequency = i.frequency AND r.slot_at = i.slot_at
      AND r.frozen_at IS NOT NULL;

    -- A run per slot that has come and has pending email items (unique: made once), with its
    -- items attached in the same statement: the run is frozen as it is made. A claim that loses
    -- the race for a run (ON CONFLICT) attaches nothing; the items were the winner's.
    WITH slots AS (
        SELECT i.organisation_id, i.user_id, i.frequency, i.slot_at, count(*)::integer AS items FROM public.digest_items i
        WHERE i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.channel = 'email' AND i.slot_at <= p_now
          AND (p_organisation IS NULL OR i.organisation_id = p_organisation)
        GROUP BY i.organisation_id, i.user_id, i.frequency, i.slot_at
        LIMIT 1000
    ),
    made AS (
        INSERT INTO public.digest_runs AS r (organisation_id, id, user_id, frequency, slot_at, next_attempt_at, frozen_at, item_count)
        SELECT s.organisation_id, gen_random_uuid(), s.user_id, s.frequency, s.slot_at, s.slot_at, now(), s.items FROM slots s
        ON CONFLICT ON CONSTRAINT digest_runs_slot_unique DO NOTHING
        RETURNING r.organisation_id, r.id, r.user_id, r.frequency, r.slot_at
    )
    UPDATE public.digest_items i SET run_id = m.id
    FROM made m
    WHERE i.organisation_id = m.organisation_id AND i.user_id = m.user_id AND i.frequency = m.frequency AND i.slot_at = m.slot_at
      AND i.run_id IS NULL AND i.sent_at IS NULL AND i.cancelled_at IS NULL AND i.channel = 'email';
    END IF;

    UPDATE public.digest_runs r
    SET status = CASE WHEN r.attempts >= r.max_attempts THEN 'DEAD' ELSE 'FAILED' END,
        last_error = 'lease expired: the worker stopped before finishing', next_attempt_at = p_now,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE r.status = 'SENDING' AND r.lease_expires_at < now()
      AND (p_organisation IS NULL OR r.organisation_id = p_organisation);

    RETURN QUERY
    WITH due AS (
        SELECT r.organisation_id, r.id FROM public.digest_runs r
        WHERE r.status IN ('PENDING', 'FAILED') AND r.next_attempt_at <= p_now
          AND (p_organisation IS NULL OR r.organisation_id = p_organisation)
        ORDER BY r.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE public.digest_runs r
    SET status = 'SENDING', attempts = r.attempts + 1, lease_owner = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
    FROM due WHERE r.organisation_id = due.organisation_id AND r.id = due.id
    RETURNING r.organisation_id, r.id, r.attempts;

    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION claim_digest_runs(text, integer, integer, timestamptz, uuid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_digest_runs(text, integer, integer, timestamptz, uuid, boolean) TO herald_worker;

-- A digest's tracked links are recorded against its items (a digest has no delivery per item).
ALTER TABLE link_clicks
    ALTER COLUMN delivery_id DROP NOT NULL,
    ADD COLUMN digest_item_id uuid,
    ADD CONSTRAINT link_clicks_digest_item_id_fk FOREIGN KEY (organisation_id, digest_item_id) REFERENCES digest_items (organisation_id, id) ON DELETE CASCADE,
    ADD CONSTRAINT link_clicks_target_valid CHECK ((delivery_id IS NULL) <> (digest_item_id IS NULL));
CREATE INDEX link_clicks_digest_item ON link_clicks (organisation_id, digest_item_id) WHERE digest_item_id IS NOT NULL;
