-- Which schedule sent an event: `GET /v1/events?schedule_id=` lists what a schedule sent, and an
-- event shows `schedule_id`.
--
-- A schedule's occurrences already carry it in their idempotency key (schedule:<id>:<occurrence>,
-- ScheduleWork), and so does a run by hand (schedule:<id>:run:<key>); the API refuses keys with
-- that prefix from clients since this migration's release. One function reads the id off a key:
-- notify writes the column with it, and the events sent before this migration are filled with
-- it below. A key of that prefix whose second part is not a UUID (a client's, before the prefix
-- was reserved) gives NULL.
--
-- A plain column, not a generated one: adding a stored generated column rewrites the whole table
-- under an exclusive lock; a nullable column without a default is only a catalogue change, and
-- the backfill touches only the events schedules sent.
--
-- No foreign key: deleting a schedule keeps the history of what it sent.

CREATE FUNCTION schedule_of_key(key text) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN key ~ '^schedule:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:'
                THEN substr(key, 10, 36)::uuid END;

ALTER TABLE events ADD COLUMN schedule_id uuid;

UPDATE events SET schedule_id = schedule_of_key(idempotency_key)
WHERE idempotency_key LIKE 'schedule:%' AND schedule_of_key(idempotency_key) IS NOT NULL;

CREATE INDEX events_schedule_time ON events (organisation_id, schedule_id, created_at DESC, id DESC)
    WHERE schedule_id IS NOT NULL;
