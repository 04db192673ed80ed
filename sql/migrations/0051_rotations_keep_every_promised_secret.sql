-- A rotation during another's overlap keeps every secret still within the overlap it was promised
-- (a trial rotated twice in a second: the first rotation's old secret, promised for 24 hours,
-- stopped signing at once, so a receiver still holding it rejected every webhook). The secrets
-- rotated away before the last one, and until when each still signs, newest first; at most
-- eight, and none once a rotation asks for no overlap.
ALTER TABLE endpoints
    ADD COLUMN older_secrets text[] NOT NULL DEFAULT '{}',
    ADD COLUMN older_secrets_until timestamptz[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT endpoints_older_secrets_paired CHECK (cardinality(older_secrets) = cardinality(older_secrets_until)
                                                         AND cardinality(older_secrets) <= 8);
