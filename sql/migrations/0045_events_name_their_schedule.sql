-- Which schedule sent an event: `GET /v1/events?schedule_id=` lists what a schedule sent, and an
-- event shows `schedule_id`.
--
-- A schedule's occurrences already carry it in their idempotency key (schedule:<id>:<occurrence>,
-- ScheduleWork), and so does a run by hand (schedule:<id>:run:<key>); the API refuses keys with
-- that prefix from clients since this migration's release. So the column is derived from the key
-- rather than written by notify: every path that sends for a schedule names it the same way, and
-- the events sent before this migration name theirs too. A key of that prefix whose second part
-- is not a UUID (a client's, before the prefix was reserved) gives NULL.
--
-- No foreign key: deleting a schedule keeps the history of what it sent.

ALTER TABLE events ADD COLUMN schedule_id uuid GENERATED ALWAYS AS (
    CASE WHEN idempotency_key ~ '^schedule:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:'
         THEN substr(idempotency_key, 10, 36)::uuid END
) STORED;

CREATE INDEX events_schedule_time ON events (organisation_id, schedule_id, created_at DESC, id DESC)
    WHERE schedule_id IS NOT NULL;
