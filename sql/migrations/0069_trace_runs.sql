-- The decision trace of the many recipients who share an event's common decision is one row per
-- run of them, not a row each (issue 12: "the trace of the many recipients who share the default
-- decision need not be a row each").
--
-- A fan-out chunk's recipients are mostly decided alike (0028 stores their decisions once, in
-- event_decisions), yet each still cost an event_recipients row: about 200 bytes, a primary-key
-- entry and its share of the statement, about a seventh of the fan-out's database time (make
-- bench, 100 000 members: the trace rows' INSERT 1 088 ms of 3 775 ms, half of it the users'
-- check, which stays). Now, when a write has at least 1 000 targeted recipients decided alike,
-- targeted by the same rule, and no per-minute limit counts its rows (0053: the limits read
-- event_recipients), those recipients are one event_recipient_runs row: their ids in order
-- (user_ids, ascending as uuid sorts; size of them), the ids of their rows (records: records_each
-- 16-byte ids per recipient in channel order, as event_recipients.record_ids, end to end), and
-- what they share. records is bytea stored out of line uncompressed (STORAGE EXTERNAL), so that a
-- page of explain reads only its recipients' bytes (a uuid[] is read whole for each element taken
-- from it: a page of 20 from a run of 10 000 read 6 MB). Every other recipient keeps its own
-- event_recipients row. A write makes one run at most; a chunk's users
-- are a range of the audience in id order, so the runs of an event never overlap, and the run of
-- a user is the one with the greatest first_user not after it.
--
-- Explain reads both (one query; a page unnests the runs it reaches, in order, up to its limit).
-- Erasure takes the user out of the runs (erase_user_records, below): a run has no foreign key
-- to users. Retention deletes runs with their event (ON DELETE CASCADE, a handful of rows).
CREATE TABLE event_recipient_runs (
    organisation_id uuid NOT NULL,
    event_id        uuid NOT NULL,
    first_user      uuid NOT NULL,
    last_user       uuid NOT NULL,
    category_id     uuid NOT NULL,
    targeted        boolean NOT NULL,
    rule            text NOT NULL,
    reason          text NOT NULL,
    notified        boolean NOT NULL,
    decision_id     uuid NOT NULL,
    records_each    integer NOT NULL CHECK (records_each >= 0),
    size            integer NOT NULL,
    user_ids        uuid[] NOT NULL,
    records         bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, event_id, first_user),
    FOREIGN KEY (organisation_id, event_id) REFERENCES events (organisation_id, id) ON DELETE CASCADE,
    CONSTRAINT event_recipient_runs_shape CHECK (
        size >= 0 AND cardinality(user_ids) = size AND user_ids[1] = first_user AND user_ids[size] = last_user
        AND length(records) = size * records_each * 16)
);
ALTER TABLE event_recipient_runs ALTER COLUMN records SET STORAGE EXTERNAL;

ALTER TABLE event_recipient_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE event_recipient_runs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON event_recipient_runs
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT ON event_recipient_runs TO herald_app;
GRANT SELECT, DELETE ON event_recipient_runs TO herald_worker;

-- A run's users exist in its organisation, and stay until the commit (FOR KEY SHARE, as
-- check_user_references does for event_recipients): a deletion of one of them waits, then its
-- erasure finds the run. 23503 otherwise, as a foreign key would say it.
CREATE FUNCTION check_run_user_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    missing uuid[];
BEGIN
    SELECT ARRAY[a.organisation_id, a.ref] INTO missing
    FROM (SELECT DISTINCT n.organisation_id, u.ref FROM added n CROSS JOIN LATERAL unnest(n.user_ids) AS u(ref)) a
    LEFT JOIN LATERAL (SELECT true AS present FROM public.users r WHERE r.organisation_id = a.organisation_id AND r.id = a.ref
                       FOR KEY SHARE) r ON true
    WHERE r.present IS NULL LIMIT 1;
    IF missing IS NOT NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, 'users', 'user_id', missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER event_recipient_runs_user_exists AFTER INSERT ON event_recipient_runs
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_run_user_references();

-- 0056's check, with the runs: a delivery or an in-app row whose (event, user) this transaction
-- traced, in a row or in a run, names a user that the trace's check found and locked.
CREATE OR REPLACE FUNCTION check_traced_user_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
    SET jit = off
AS $$
DECLARE
    missing uuid[];
    this_xact xid := pg_current_xact_id()::xid;
BEGIN
    SELECT ARRAY[s.organisation_id, s.user_id] INTO missing
    FROM (SELECT a.organisation_id, a.event_id, a.user_id FROM added a
          EXCEPT
          (SELECT t.organisation_id, t.event_id, t.user_id
           FROM (SELECT a.organisation_id, a.event_id, min(a.user_id::text COLLATE "C")::uuid AS first_user,
                        max(a.user_id::text COLLATE "C")::uuid AS last_user
                 FROM added a GROUP BY a.organisation_id, a.event_id) k
           CROSS JOIN LATERAL (SELECT t.organisation_id, t.event_id, t.user_id FROM public.event_recipients t
                               WHERE t.organisation_id = k.organisation_id AND t.event_id = k.event_id
                                 AND t.user_id BETWEEN k.first_user AND k.last_user AND t.xmin = this_xact
                               OFFSET 0) t
           UNION ALL
           SELECT r.organisation_id, r.event_id, u.user_id
           FROM (SELECT DISTINCT a.organisation_id, a.event_id FROM added a) k
           JOIN public.event_recipient_runs r ON r.organisation_id = k.organisation_id AND r.event_id = k.event_id
                                             AND r.xmin = this_xact
           CROSS JOIN LATERAL unnest(r.user_ids) AS u(user_id))) s
    LEFT JOIN LATERAL (SELECT true AS present FROM public.users r
                       WHERE r.organisation_id = s.organisation_id AND r.id = s.user_id
                       FOR KEY SHARE) r ON true
    WHERE r.present IS NULL LIMIT 1;
    IF missing IS NOT NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, 'users', 'user_id', missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;

-- Erasure (0063) also takes the user out of every run of the organisation that holds them: their
-- id, and their rows' ids at the same place. A run left empty goes. Found by each run's range
-- (first_user, last_user), without reading the ids of the runs that cannot hold the user.
CREATE OR REPLACE FUNCTION erase_user_records(p_user uuid)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    sending integer;
BEGIN
    IF org IS NULL OR p_user IS NULL THEN
        RAISE EXCEPTION 'erase_user_records: an organisation (app.org_id) and a user are required';
    END IF;
    SELECT count(*) FILTER (WHERE r.status = 'SENDING') INTO sending
    FROM (SELECT status FROM public.digest_runs WHERE organisation_id = org AND user_id = p_user FOR UPDATE) r;
    IF sending > 0 THEN
        RETURN sending;
    END IF;
    DELETE FROM public.notification_contents c
    USING public.notifications n
    WHERE n.organisation_id = org AND n.user_id = p_user AND n.content_id = n.id
      AND c.organisation_id = org AND c.id = n.id;
    UPDATE public.audit_log
    SET before = CASE WHEN before IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END,
        after = CASE WHEN after IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END
    WHERE organisation_id = org AND target_type = 'user' AND lower(target_id) = p_user::text;
    -- The user's place is read from the row being changed (array_position in the SET list), so
    -- that two erasures of one run's users at once each take out their own: the second waits for
    -- the first's row and is then applied to the row as the first left it. A run left empty (a
    -- moment's state, allowed by its check) is deleted after.
    UPDATE public.event_recipient_runs r
    SET user_ids = r.user_ids[:array_position(r.user_ids, p_user) - 1] || r.user_ids[array_position(r.user_ids, p_user) + 1:],
        records = substring(r.records FROM 1 FOR (array_position(r.user_ids, p_user) - 1) * r.records_each * 16)
                  || substring(r.records FROM array_position(r.user_ids, p_user) * r.records_each * 16 + 1),
        size = r.size - 1,
        first_user = CASE WHEN r.size > 1 AND r.first_user = p_user THEN r.user_ids[2] ELSE r.first_user END,
        last_user = CASE WHEN r.size > 1 AND r.last_user = p_user THEN r.user_ids[r.size - 1] ELSE r.last_user END
    WHERE r.organisation_id = org AND r.first_user <= p_user AND r.last_user >= p_user AND p_user = ANY(r.user_ids);
    DELETE FROM public.event_recipient_runs WHERE organisation_id = org AND size = 0;
    RETURN 0;
END
$$;
REVOKE ALL ON FUNCTION erase_user_records(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION erase_user_records(uuid) TO herald_app;
