-- Webhook and chat go to the organisation's endpoints, not to one person: a user's own setting
-- no longer applies to them (a trial's member switched the team's Slack channel on for their own
-- alerts, and the backend's webhook off for themself). The engine reads only the organisation's
-- defaults and the type's channels for them, and the API refuses a user's cell for them; the
-- cells stored before would be listed back as settings that do nothing, so they go. The owner
-- runs migrations without BYPASSRLS, so row-level security is lifted for the delete and forced
-- again.
ALTER TABLE preferences NO FORCE ROW LEVEL SECURITY;
DELETE FROM preferences WHERE channel IN ('webhook', 'chat');
ALTER TABLE preferences FORCE ROW LEVEL SECURITY;
