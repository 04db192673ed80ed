-- A chunked fan-out that keeps failing gives up (found reviewing issue 12's 0021).
--
-- A chunk that fails rolls back whole and frees its lease; the next claim tries the same chunk
-- again. One that fails every time (a bug, a row it cannot write) was tried again every second,
-- forever. Now each failure is counted, with its error; the tenth in a row ends the fan-out
-- FAILED (what was written stays, like a cancellation), and a chunk that succeeds resets the
-- count. GET /v1/events/{id} shows the state and the last error.
ALTER TABLE events
    ADD COLUMN fanout_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN fanout_error text,
    DROP CONSTRAINT events_fanout_state_valid,
    ADD CONSTRAINT events_fanout_state_valid CHECK (fanout_state IN ('EXPANDING', 'DONE', 'CANCELLED', 'FAILED'));
