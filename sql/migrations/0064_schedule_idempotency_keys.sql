-- POST /v1/schedules honours Idempotency-Key (a trial: a client retrying a create after a
-- timeout made two schedules, and every occurrence went out twice, for good). The key and a
-- hash of the request are kept on the schedule; the same key with the same body answers the
-- schedule it made, with another body 422. Unique per organisation among its schedules (a
-- deleted schedule frees its key), apart from events' keys.
ALTER TABLE schedules
    ADD COLUMN idempotency_key text CONSTRAINT schedules_idempotency_key_valid CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    ADD COLUMN request_hash text;
CREATE UNIQUE INDEX schedules_idempotency ON schedules (organisation_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
