-- Faults at the receiver (issue 8, item 13): an endpoint that keeps timing out is paused by a
-- circuit breaker, so it only slows itself. No new table: the breaker's state lives on the
-- endpoint, under the endpoint's tenant policy.
--   circuit_failures  consecutive attempts that got no answer (timeout, refused connection)
--   circuit_opened_at when the breaker opened; NULL = closed
--   circuit_retry_at  the end of the cool-down: open before it, half-open after it, when the
--                     next delivery is a trial that closes the breaker on an answer or opens it
--                     again on another failure (a worker taking the trial moves retry_at on)
--   circuit_reason    why it opened, in words a tenant admin understands
-- One change per statement and named constraints, as a distributed PostgreSQL (Citus) needs.
ALTER TABLE endpoints ADD COLUMN circuit_failures integer NOT NULL DEFAULT 0;
ALTER TABLE endpoints ADD CONSTRAINT endpoints_circuit_failures_check CHECK (circuit_failures >= 0);
ALTER TABLE endpoints ADD COLUMN circuit_opened_at timestamptz;
ALTER TABLE endpoints ADD COLUMN circuit_retry_at timestamptz;
ALTER TABLE endpoints ADD COLUMN circuit_reason text;
