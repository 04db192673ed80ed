-- Ready for a distributed PostgreSQL (Citus, distributed by organisation_id): issue 9, part 6.
-- Each change is harmless on a single PostgreSQL; together they remove what fails on Citus.
-- One change per statement: Citus refuses an ALTER TABLE that mixes subcommands.

-- 1. No restrictive policy. Citus copies an AS RESTRICTIVE policy to the shards as a permissive
-- one, which there WIDENS the tenant policy: the recipient rule of notifications and feed_state
-- let a user (and, with no context, anyone) read other rows. The rule moves into the one
-- permissive tenant policy of each table, for reading (USING) and writing (WITH CHECK), as the
-- restrictive policy applied it to both. Same meaning: no recipient set (NULL or '') = the
-- tenant's rows; a recipient set = only that user's rows. No IS NULL in a policy expression:
-- Citus cannot create one on a distributed table, hence coalesce(..., '') = ''.
-- Neither table has a policy for herald_worker or the owner (no grant, no claim path).
ALTER POLICY tenant_isolation ON notifications
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
           AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid))
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
                AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                     OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid));
DROP POLICY recipient_only ON notifications;

ALTER POLICY tenant_isolation ON feed_state
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
           AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid))
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
                AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                     OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid));
DROP POLICY recipient_only ON feed_state;

-- 2. No ON DELETE SET NULL on a foreign key whose columns include organisation_id (Citus does
-- not take it on the distribution column, and the column-list form is PostgreSQL 15 only).
-- Plain foreign keys instead; the code that deletes clears the column first:
--   deliveries.endpoint_id: deleteEndpoint (Sources/HeraldStore/Endpoints.swift) sets it NULL
--     on the endpoint's deliveries, which keep their history and end DEAD (nowhere to go).
--   api_keys.created_by_user_id: Herald never deletes a user (it deactivates); a user row goes
--     only with its organisation, whose cascade removes the keys in the same statement.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_organisation_id_endpoint_id_fkey;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_endpoint_id_fk
    FOREIGN KEY (organisation_id, endpoint_id) REFERENCES endpoints (organisation_id, id);
ALTER TABLE api_keys DROP CONSTRAINT api_keys_organisation_id_created_by_user_id_fkey;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_created_by_user_id_fk
    FOREIGN KEY (organisation_id, created_by_user_id) REFERENCES users (organisation_id, id);

-- 3. Every constraint has a name chosen here, not one PostgreSQL derived (endpoints_check1 says
-- nothing, and code matches on these names: Sources/HeraldAPI/Problem.swift). Convention:
--   <table>_<columns>_fk      foreign key (organisation_id left out of a composite key's name)
--   <table>_<columns>_unique  unique key (likewise)
--   <table>_<column>_valid    check on one column; a check across columns says what it means
-- Primary keys keep <table>_pkey; endpoints_circuit_failures_check was named in 0005.
ALTER TABLE api_keys RENAME CONSTRAINT api_keys_organisation_id_fkey TO api_keys_organisation_id_fk;
ALTER TABLE api_keys RENAME CONSTRAINT api_keys_organisation_id_role_id_fkey TO api_keys_role_id_fk;
ALTER TABLE api_keys RENAME CONSTRAINT api_keys_name_check TO api_keys_name_valid;
ALTER TABLE audit_log RENAME CONSTRAINT audit_log_organisation_id_fkey TO audit_log_organisation_id_fk;
ALTER TABLE audit_log RENAME CONSTRAINT audit_log_actor_type_check TO audit_log_actor_type_valid;
ALTER TABLE categories RENAME CONSTRAINT categories_organisation_id_key_key TO categories_key_unique;
ALTER TABLE categories RENAME CONSTRAINT categories_organisation_id_fkey TO categories_organisation_id_fk;
ALTER TABLE categories RENAME CONSTRAINT categories_key_check TO categories_key_valid;
ALTER TABLE categories RENAME CONSTRAINT categories_name_check TO categories_name_valid;
ALTER TABLE deliveries RENAME CONSTRAINT deliveries_organisation_id_event_id_fkey TO deliveries_event_id_fk;
ALTER TABLE deliveries RENAME CONSTRAINT deliveries_organisation_id_user_id_fkey TO deliveries_user_id_fk;
ALTER TABLE deliveries RENAME CONSTRAINT deliveries_channel_check TO deliveries_channel_valid;
ALTER TABLE deliveries RENAME CONSTRAINT deliveries_max_attempts_check TO deliveries_max_attempts_valid;
ALTER TABLE deliveries RENAME CONSTRAINT deliveries_status_check TO deliveries_status_valid;
ALTER TABLE delivery_attempts RENAME CONSTRAINT delivery_attempts_organisation_id_delivery_id_fkey TO delivery_attempts_delivery_id_fk;
ALTER TABLE delivery_attempts RENAME CONSTRAINT delivery_attempts_outcome_check TO delivery_attempts_outcome_valid;
ALTER TABLE digest_items RENAME CONSTRAINT digest_items_organisation_id_event_id_fkey TO digest_items_event_id_fk;
ALTER TABLE digest_items RENAME CONSTRAINT digest_items_organisation_id_user_id_fkey TO digest_items_user_id_fk;
ALTER TABLE digest_items RENAME CONSTRAINT digest_items_channel_check TO digest_items_channel_valid;
ALTER TABLE digest_items RENAME CONSTRAINT digest_items_frequency_check TO digest_items_frequency_valid;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_organisation_id_fkey TO endpoints_organisation_id_fk;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_channel_check TO endpoints_channel_valid;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_check TO endpoints_format_matches_channel;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_check1 TO endpoints_secret_matches_channel;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_format_check TO endpoints_format_valid;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_name_check TO endpoints_name_valid;
ALTER TABLE endpoints RENAME CONSTRAINT endpoints_url_check TO endpoints_url_valid;
ALTER TABLE event_recipients RENAME CONSTRAINT event_recipients_organisation_id_event_id_fkey TO event_recipients_event_id_fk;
ALTER TABLE event_recipients RENAME CONSTRAINT event_recipients_organisation_id_user_id_fkey TO event_recipients_user_id_fk;
ALTER TABLE events RENAME CONSTRAINT events_organisation_id_idempotency_key_key TO events_idempotency_key_unique;
ALTER TABLE events RENAME CONSTRAINT events_organisation_id_fkey TO events_organisation_id_fk;
ALTER TABLE events RENAME CONSTRAINT events_organisation_id_type_id_fkey TO events_type_id_fk;
ALTER TABLE events RENAME CONSTRAINT events_actor_type_check TO events_actor_type_valid;
ALTER TABLE events RENAME CONSTRAINT events_priority_check TO events_priority_valid;
ALTER TABLE events RENAME CONSTRAINT events_severity_check TO events_severity_valid;
ALTER TABLE events RENAME CONSTRAINT events_status_check TO events_status_valid;
ALTER TABLE events RENAME CONSTRAINT events_url_check TO events_url_valid;
ALTER TABLE feed_state RENAME CONSTRAINT feed_state_organisation_id_user_id_fkey TO feed_state_user_id_fk;
ALTER TABLE group_members RENAME CONSTRAINT group_members_organisation_id_group_id_fkey TO group_members_group_id_fk;
ALTER TABLE group_members RENAME CONSTRAINT group_members_organisation_id_user_id_fkey TO group_members_user_id_fk;
ALTER TABLE groups RENAME CONSTRAINT groups_organisation_id_key_key TO groups_key_unique;
ALTER TABLE groups RENAME CONSTRAINT groups_organisation_id_fkey TO groups_organisation_id_fk;
ALTER TABLE groups RENAME CONSTRAINT groups_key_check TO groups_key_valid;
ALTER TABLE groups RENAME CONSTRAINT groups_name_check TO groups_name_valid;
ALTER TABLE link_clicks RENAME CONSTRAINT link_clicks_organisation_id_delivery_id_fkey TO link_clicks_delivery_id_fk;
ALTER TABLE link_clicks RENAME CONSTRAINT link_clicks_organisation_id_user_id_fkey TO link_clicks_user_id_fk;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_organisation_id_key_key TO notification_types_key_unique;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_organisation_id_category_id_fkey TO notification_types_category_id_fk;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_organisation_id_fkey TO notification_types_organisation_id_fk;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_default_channels_check TO notification_types_default_channels_valid;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_default_priority_check TO notification_types_default_priority_valid;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_default_severity_check TO notification_types_default_severity_valid;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_key_check TO notification_types_key_valid;
ALTER TABLE notification_types RENAME CONSTRAINT notification_types_name_check TO notification_types_name_valid;
ALTER TABLE notifications RENAME CONSTRAINT notifications_organisation_id_event_id_fkey TO notifications_event_id_fk;
ALTER TABLE notifications RENAME CONSTRAINT notifications_organisation_id_user_id_fkey TO notifications_user_id_fk;
ALTER TABLE organisations RENAME CONSTRAINT organisations_slug_key TO organisations_slug_unique;
ALTER TABLE organisations RENAME CONSTRAINT organisations_name_check TO organisations_name_valid;
ALTER TABLE organisations RENAME CONSTRAINT organisations_settings_check TO organisations_settings_valid;
ALTER TABLE organisations RENAME CONSTRAINT organisations_slug_check TO organisations_slug_valid;
ALTER TABLE preference_defaults RENAME CONSTRAINT preference_defaults_organisation_id_category_id_fkey TO preference_defaults_category_id_fk;
ALTER TABLE preference_defaults RENAME CONSTRAINT preference_defaults_channel_check TO preference_defaults_channel_valid;
ALTER TABLE preference_defaults RENAME CONSTRAINT preference_defaults_conditions_check TO preference_defaults_conditions_valid;
ALTER TABLE preference_defaults RENAME CONSTRAINT preference_defaults_frequency_check TO preference_defaults_frequency_valid;
ALTER TABLE preferences RENAME CONSTRAINT preferences_organisation_id_category_id_fkey TO preferences_category_id_fk;
ALTER TABLE preferences RENAME CONSTRAINT preferences_organisation_id_user_id_fkey TO preferences_user_id_fk;
ALTER TABLE preferences RENAME CONSTRAINT preferences_channel_check TO preferences_channel_valid;
ALTER TABLE preferences RENAME CONSTRAINT preferences_conditions_check TO preferences_conditions_valid;
ALTER TABLE preferences RENAME CONSTRAINT preferences_frequency_check TO preferences_frequency_valid;
ALTER TABLE refresh_tokens RENAME CONSTRAINT refresh_tokens_organisation_id_fkey TO refresh_tokens_organisation_id_fk;
ALTER TABLE refresh_tokens RENAME CONSTRAINT refresh_tokens_organisation_id_user_id_fkey TO refresh_tokens_user_id_fk;
ALTER TABLE role_permissions RENAME CONSTRAINT role_permissions_organisation_id_role_id_fkey TO role_permissions_role_id_fk;
ALTER TABLE role_permissions RENAME CONSTRAINT role_permissions_permission_check TO role_permissions_permission_valid;
ALTER TABLE roles RENAME CONSTRAINT roles_organisation_id_key_key TO roles_key_unique;
ALTER TABLE roles RENAME CONSTRAINT roles_organisation_id_fkey TO roles_organisation_id_fk;
ALTER TABLE roles RENAME CONSTRAINT roles_key_check TO roles_key_valid;
ALTER TABLE roles RENAME CONSTRAINT roles_name_check TO roles_name_valid;
ALTER TABLE templates RENAME CONSTRAINT templates_organisation_id_type_id_fkey TO templates_type_id_fk;
ALTER TABLE templates RENAME CONSTRAINT templates_channel_check TO templates_channel_valid;
ALTER TABLE user_roles RENAME CONSTRAINT user_roles_organisation_id_role_id_fkey TO user_roles_role_id_fk;
ALTER TABLE user_roles RENAME CONSTRAINT user_roles_organisation_id_user_id_fkey TO user_roles_user_id_fk;
ALTER TABLE users RENAME CONSTRAINT users_organisation_id_fkey TO users_organisation_id_fk;
ALTER TABLE users RENAME CONSTRAINT users_attributes_check TO users_attributes_valid;
ALTER TABLE users RENAME CONSTRAINT users_display_name_check TO users_display_name_valid;
ALTER TABLE users RENAME CONSTRAINT users_email_check TO users_email_valid;

-- 4. SQL functions: none needs redefining. notification_read reads no table;
-- organisation_id_for_slug (login, by slug) and claim_deliveries (the workers' claim across
-- organisations) are the SECURITY DEFINER paths that cannot name one organisation, and
-- claim_deliveries already joins and filters on organisation_id when given one.
