-- Delivery over real protocols: webhook and chat endpoints, what a worker needs to read to
-- render and send, click tracking and engagement.

-- Where webhook and chat deliveries go. One table for both channels: a webhook endpoint signs
-- per Standard Webhooks with its secret; a chat endpoint is a Slack or Mattermost incoming
-- webhook and has no secret. event_types empty = every notification type.
-- The secret is stored as issued: HMAC needs it, so it cannot be hashed like an API key.
-- During a rotation the previous secret still signs (a second signature) until it expires.
CREATE TABLE endpoints (
    organisation_id            uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id                         uuid NOT NULL,
    channel                    text NOT NULL CHECK (channel IN ('webhook', 'chat')),
    format                     text NOT NULL CHECK (format IN ('standard', 'slack', 'mattermost')),
    name                       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    url                        text NOT NULL CHECK (length(url) BETWEEN 8 AND 2048),
    event_types                text[] NOT NULL DEFAULT '{}',
    enabled                    boolean NOT NULL DEFAULT true,
    disabled_reason            text,
    secret                     text,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    CHECK ((channel = 'webhook') = (format = 'standard')),
    CHECK ((channel = 'webhook') = (secret IS NOT NULL))
);
CREATE INDEX endpoints_created ON endpoints (organisation_id, created_at, id);
ALTER TABLE endpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE endpoints FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON endpoints
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON endpoints TO herald_app;
-- Workers read endpoints and disable one that answered 410 Gone.
GRANT SELECT, UPDATE ON endpoints TO herald_worker;

-- A webhook or chat delivery names its endpoint; deleting the endpoint keeps the delivery's
-- history and leaves it nowhere to go (the worker ends it DEAD).
ALTER TABLE deliveries
    ADD COLUMN endpoint_id uuid,
    ADD FOREIGN KEY (organisation_id, endpoint_id) REFERENCES endpoints (organisation_id, id) ON DELETE SET NULL (endpoint_id),
    ADD COLUMN last_response text;
CREATE INDEX deliveries_endpoint ON deliveries (organisation_id, endpoint_id) WHERE endpoint_id IS NOT NULL;
CREATE INDEX deliveries_created ON deliveries (organisation_id, created_at DESC, id DESC);

-- The link a notification points at (click tracking redirects only there).
ALTER TABLE events ADD COLUMN url text CHECK (url IS NULL OR length(url) BETWEEN 8 AND 2048);

-- Engagement: the last time the user clicked through a notification.
ALTER TABLE users ADD COLUMN last_engaged_at timestamptz;

CREATE TABLE link_clicks (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    delivery_id     uuid NOT NULL,
    user_id         uuid NOT NULL,
    clicked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, delivery_id) REFERENCES deliveries (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX link_clicks_delivery ON link_clicks (organisation_id, delivery_id);
ALTER TABLE link_clicks ENABLE ROW LEVEL SECURITY;
ALTER TABLE link_clicks FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON link_clicks
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT ON link_clicks TO herald_app;
GRANT SELECT ON link_clicks TO herald_worker;

-- What a worker reads to render and send a delivery, always under the tenant policy.
GRANT SELECT ON organisations, users, events, notification_types, categories, templates TO herald_worker;
-- Workers record the receiver's reply.
GRANT SELECT, UPDATE ON deliveries TO herald_worker;
