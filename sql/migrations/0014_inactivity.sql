-- Inactivity (issue 11, the club's rule). An organisation may switch it on: after
-- inactivity_days (365) without engagement (a tracked click, a login, a feed read), a user gets a
-- warning email with a signed "keep me subscribed" link (following it is engagement);
-- inactivity_grace_days (14) later, still without engagement, the user's email subscriptions to
-- non-critical categories are switched off, audited, and explain says why (SWITCHED_OFF_INACTIVE).
-- The `inactivity` job (daily, 04:30 in the organisation's zone) runs the sweep.

ALTER TABLE organisations
    ADD COLUMN inactivity_enabled boolean NOT NULL DEFAULT false,
    ADD COLUMN inactivity_days integer NOT NULL DEFAULT 365
        CONSTRAINT organisations_inactivity_days_valid CHECK (inactivity_days BETWEEN 7 AND 3650),
    ADD COLUMN inactivity_grace_days integer NOT NULL DEFAULT 14
        CONSTRAINT organisations_inactivity_grace_days_valid CHECK (inactivity_grace_days BETWEEN 1 AND 365);

-- last_engaged_at (0004) was the last tracked click, NULL before the first. Users who never
-- clicked count as engaged now: switching the rule on never warns anyone at once.
UPDATE users SET last_engaged_at = now() WHERE last_engaged_at IS NULL;
ALTER TABLE users
    ALTER COLUMN last_engaged_at SET DEFAULT now(),
    ALTER COLUMN last_engaged_at SET NOT NULL,
    ADD COLUMN inactivity_warned_at timestamptz,
    ADD COLUMN inactivity_switched_off_at timestamptz;
CREATE INDEX users_engagement ON users (organisation_id, last_engaged_at) WHERE active;

-- Why Herald, not the user, switched a preference off; NULL for the user's own settings (saving
-- preferences clears it).
ALTER TABLE preferences
    ADD COLUMN switched_off text CONSTRAINT preferences_switched_off_valid CHECK (switched_off IN ('INACTIVITY'));

ALTER TABLE jobs DROP CONSTRAINT jobs_name_valid;
ALTER TABLE jobs ADD CONSTRAINT jobs_name_valid CHECK (name IN ('retention', 'purge-expired', 'inactivity'));

-- The sweep reads and marks users, switches preferences off and audits, as the worker role under
-- the tenant policy.
GRANT UPDATE (inactivity_warned_at, inactivity_switched_off_at) ON users TO herald_worker;
GRANT INSERT, UPDATE ON preferences TO herald_worker;
GRANT INSERT ON audit_log TO herald_worker;
