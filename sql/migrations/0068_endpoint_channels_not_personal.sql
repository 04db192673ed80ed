-- Webhook and chat go to the organisation's endpoints, not to one person: a user's own setting
-- no longer applies to them (a trial's member switched the team's Slack channel on for their own
-- alerts, and the backend's webhook off for themself). The engine reads only the organisation's
-- defaults and the type's channels for them, and the API refuses a user's cell for them; the
-- cells stored before would be listed back as settings that do nothing, so they go. The owner
-- runs migrations without BYPASSRLS, so row-level security is lifted for the delete and forced
-- again.
--
-- In-app of a critical category is always on, at once, without conditions (the critical
-- override): a cell saying otherwise never applied, and the API now refuses it, so a settings
-- page that writes back what it read would get a 422. Such cells go too, from users' settings and
-- the organisation's defaults. (A category made critical later loses them the same way.)
ALTER TABLE preferences NO FORCE ROW LEVEL SECURITY;
ALTER TABLE preference_defaults NO FORCE ROW LEVEL SECURITY;
ALTER TABLE categories NO FORCE ROW LEVEL SECURITY;
DELETE FROM preferences WHERE channel IN ('webhook', 'chat');
DELETE FROM preferences p USING categories c
WHERE c.organisation_id = p.organisation_id AND c.id = p.category_id AND c.critical AND p.channel = 'in_app'
  AND (NOT p.enabled OR p.frequency <> 'IMMEDIATE' OR p.conditions <> '[]'::jsonb);
DELETE FROM preference_defaults p USING categories c
WHERE c.organisation_id = p.organisation_id AND c.id = p.category_id AND c.critical AND p.channel = 'in_app'
  AND (NOT p.enabled OR p.frequency <> 'IMMEDIATE' OR p.conditions <> '[]'::jsonb);
ALTER TABLE preferences FORCE ROW LEVEL SECURITY;
ALTER TABLE preference_defaults FORCE ROW LEVEL SECURITY;
ALTER TABLE categories FORCE ROW LEVEL SECURITY;
