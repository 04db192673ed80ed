-- Issue 8: tags on events (CRM teams filter their feed by `team:sales`), stored once per event;
-- and the per-user throttle across all categories, which counts a user's recent rows.
ALTER TABLE events ADD COLUMN tags text[] NOT NULL DEFAULT '{}';

CREATE INDEX event_recipients_recent ON event_recipients (organisation_id, created_at) INCLUDE (user_id) WHERE notified;
