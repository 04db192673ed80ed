-- The channel vocabulary, defined once (issue 9, part 4). Until now each table listed the
-- channels in its own CHECK; a new channel meant four lists. Now one domain holds the words, and
-- a table says only what is particular to it (the outbox never holds in-app rows; endpoints are
-- webhook or chat). A new channel (SMS, web push) is one ALTER DOMAIN pair in its migration.
--
-- Columns of a domain type still reach clients as `text` (PostgreSQL describes a domain column by
-- its base type), so the application binds and reads them as before. One change per statement.

CREATE DOMAIN notification_channel AS text
    CONSTRAINT notification_channel_known CHECK (VALUE IN ('in_app', 'email', 'webhook', 'chat'));

ALTER TABLE templates DROP CONSTRAINT templates_channel_valid;
ALTER TABLE templates ALTER COLUMN channel TYPE notification_channel;

ALTER TABLE preferences DROP CONSTRAINT preferences_channel_valid;
ALTER TABLE preferences ALTER COLUMN channel TYPE notification_channel;

ALTER TABLE preference_defaults DROP CONSTRAINT preference_defaults_channel_valid;
ALTER TABLE preference_defaults ALTER COLUMN channel TYPE notification_channel;

-- The outbox holds what is sent, never the feed's rows.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_channel_valid;
ALTER TABLE deliveries ALTER COLUMN channel TYPE notification_channel;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_channel_outbox CHECK (channel <> 'in_app');

ALTER TABLE digest_items DROP CONSTRAINT digest_items_channel_valid;
ALTER TABLE digest_items ALTER COLUMN channel TYPE notification_channel;
ALTER TABLE digest_items ADD CONSTRAINT digest_items_channel_outbox CHECK (channel <> 'in_app');

-- Endpoints are the channels that send to an organisation's URLs; their format and secret
-- rules (endpoints_format_matches_channel, endpoints_secret_matches_channel) name webhook.
ALTER TABLE endpoints DROP CONSTRAINT endpoints_channel_valid;
ALTER TABLE endpoints ALTER COLUMN channel TYPE notification_channel;
ALTER TABLE endpoints ADD CONSTRAINT endpoints_channel_endpoint CHECK (channel IN ('webhook', 'chat'));

-- A type's default channels: every element must be a channel (the cast checks the domain).
ALTER TABLE notification_types DROP CONSTRAINT notification_types_default_channels_valid;
ALTER TABLE notification_types ADD CONSTRAINT notification_types_default_channels_known
    CHECK (cardinality(default_channels::notification_channel[]) >= 0);
