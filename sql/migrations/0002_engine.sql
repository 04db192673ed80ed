-- The notification engine: the catalogue (categories, notification types, templates),
-- preferences and organisation defaults, events, in-app notifications, the outbox
-- (deliveries), digest items and the decision trace. Same rules as 0001: organisation_id
-- on every row, RLS enabled and forced with the tenant policy, composite foreign keys,
-- indexes that lead with organisation_id.

-- GIN indexes that lead with organisation_id need btree_gin (a trusted extension).
CREATE EXTENSION IF NOT EXISTS btree_gin;

CREATE TABLE categories (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    key             text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9_-]{1,63}$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description     text NOT NULL DEFAULT '',
    critical        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    UNIQUE (organisation_id, key)
);

CREATE TABLE notification_types (
    organisation_id  uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    key              text NOT NULL CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{1,99}$'),
    category_id      uuid NOT NULL,
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description      text NOT NULL DEFAULT '',
    default_severity text NOT NULL DEFAULT 'INFO' CHECK (default_severity IN ('INFO', 'WARNING', 'CRITICAL')),
    default_priority text NOT NULL DEFAULT 'normal' CHECK (default_priority IN ('low', 'normal', 'high', 'critical')),
    default_channels text[] NOT NULL DEFAULT '{in_app}' CHECK (default_channels <@ ARRAY['in_app', 'email', 'webhook', 'chat']),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    UNIQUE (organisation_id, key),
    FOREIGN KEY (organisation_id, category_id) REFERENCES categories (organisation_id, id)
);
CREATE INDEX notification_types_category ON notification_types (organisation_id, category_id);

CREATE TABLE templates (
    organisation_id uuid NOT NULL,
    type_id         uuid NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('in_app', 'email', 'webhook', 'chat')),
    locale          text NOT NULL,
    subject         text NOT NULL DEFAULT '',
    body            text NOT NULL,
    html            text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, type_id, channel, locale),
    FOREIGN KEY (organisation_id, type_id) REFERENCES notification_types (organisation_id, id) ON DELETE CASCADE
);

CREATE TABLE preference_defaults (
    organisation_id uuid NOT NULL,
    category_id     uuid NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('in_app', 'email', 'webhook', 'chat')),
    enabled         boolean NOT NULL,
    frequency       text NOT NULL CHECK (frequency IN ('IMMEDIATE', 'DAILY', 'WEEKLY', 'NONE')),
    conditions      jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(conditions) = 'array'),
    PRIMARY KEY (organisation_id, category_id, channel),
    FOREIGN KEY (organisation_id, category_id) REFERENCES categories (organisation_id, id) ON DELETE CASCADE
);

CREATE TABLE preferences (
    organisation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    category_id     uuid NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('in_app', 'email', 'webhook', 'chat')),
    enabled         boolean NOT NULL,
    frequency       text NOT NULL CHECK (frequency IN ('IMMEDIATE', 'DAILY', 'WEEKLY', 'NONE')),
    conditions      jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(conditions) = 'array'),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, user_id, category_id, channel),
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, category_id) REFERENCES categories (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX preferences_category ON preferences (organisation_id, category_id, user_id);

-- One call of notify. The idempotency key is unique per organisation for as long as the event
-- is kept; request_hash tells a replay from a different body under the same key.
CREATE TABLE events (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL,
    type_id         uuid NOT NULL,
    actor_type      text NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id        uuid,
    source_actor    jsonb,
    audience        jsonb NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}'::jsonb,
    subject_type    text,
    subject_id      text,
    severity        text NOT NULL CHECK (severity IN ('INFO', 'WARNING', 'CRITICAL')),
    priority        text NOT NULL CHECK (priority IN ('low', 'normal', 'high', 'critical')),
    deliver_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    status          text NOT NULL DEFAULT 'ACCEPTED' CHECK (status IN ('ACCEPTED', 'CANCELLED')),
    idempotency_key text,
    request_hash    text,
    counts          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    cancelled_at    timestamptz,
    PRIMARY KEY (organisation_id, id),
    UNIQUE (organisation_id, idempotency_key),
    FOREIGN KEY (organisation_id, type_id) REFERENCES notification_types (organisation_id, id)
);
CREATE INDEX events_type_time ON events (organisation_id, type_id, created_at DESC, id DESC);
CREATE INDEX events_time ON events (organisation_id, created_at DESC, id DESC);

-- The in-app feed. Ids are UUID v7 taken at the moment the row becomes visible, so the feed
-- pages by id. Read state: a row is read when read_at is set, or when it is covered by the
-- user's "all read" watermark (feed_state) and was not explicitly marked unread. Covered means
-- its id is at or below read_through AND the transaction that wrote it had committed when the
-- watermark was set (created_xid visible in read_snapshot): a row of a fan-out still committing
-- then arrives unread, even though its id was stamped before the click. Rows at or below
-- read_settled (15 minutes before the click, far longer than any notify transaction) are
-- covered without the snapshot check, so the unread count only ever reads recent rows.
CREATE TABLE notifications (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL,
    event_id        uuid NOT NULL,
    user_id         uuid NOT NULL,
    type_id         uuid NOT NULL,
    category_id     uuid NOT NULL,
    severity        text NOT NULL,
    priority        text NOT NULL,
    title           text NOT NULL,
    body            text NOT NULL,
    visible_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    read_at         timestamptz,
    unread_pinned   boolean NOT NULL DEFAULT false,
    archived_at     timestamptz,
    created_xid     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    search          tsvector GENERATED ALWAYS AS (to_tsvector('simple', title || ' ' || body)) STORED,
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, event_id) REFERENCES events (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX notifications_feed ON notifications (organisation_id, user_id, id DESC);
CREATE INDEX notifications_unread ON notifications (organisation_id, user_id, id) WHERE read_at IS NULL;
CREATE INDEX notifications_pinned ON notifications (organisation_id, user_id, id) WHERE unread_pinned;
CREATE INDEX notifications_event ON notifications (organisation_id, event_id);
CREATE INDEX notifications_search ON notifications USING gin (organisation_id, user_id, search);
CREATE INDEX notifications_expiry ON notifications (organisation_id, expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE feed_state (
    organisation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    read_through    uuid NOT NULL,
    read_snapshot   pg_snapshot NOT NULL,
    read_settled    uuid NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, user_id),
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);

-- Whether a row is read for its recipient, given their feed_state row (NULL when they never
-- marked all read): the one definition every feed statement uses. Not pinned unread, and either
-- marked read, or below the settled watermark, or below the watermark and written by a
-- transaction that had committed at the click.
CREATE FUNCTION notification_read(n notifications, fs feed_state) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$ SELECT NOT n.unread_pinned AND (n.read_at IS NOT NULL OR coalesce(
              n.id <= fs.read_settled OR (n.id <= fs.read_through AND pg_visible_in_snapshot(n.created_xid, fs.read_snapshot)), false)) $$;

-- The outbox: one row per message to send (email, webhook, chat). Written PENDING by notify;
-- delivered by the worker pool (issue 4).
CREATE TABLE deliveries (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL,
    event_id        uuid NOT NULL,
    user_id         uuid NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('email', 'webhook', 'chat')),
    destination     text NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SENDING', 'SENT', 'FAILED', 'DEAD', 'CANCELLED')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, event_id) REFERENCES events (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX deliveries_event ON deliveries (organisation_id, event_id);
CREATE INDEX deliveries_pending ON deliveries (organisation_id, next_attempt_at) WHERE status = 'PENDING';

CREATE TABLE digest_items (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL,
    event_id        uuid NOT NULL,
    user_id         uuid NOT NULL,
    category_id     uuid NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('email', 'webhook', 'chat')),
    frequency       text NOT NULL CHECK (frequency IN ('DAILY', 'WEEKLY')),
    due_after       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    cancelled_at    timestamptz,
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, event_id) REFERENCES events (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX digest_items_pending ON digest_items (organisation_id, user_id, frequency) WHERE sent_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX digest_items_event ON digest_items (organisation_id, event_id);

-- The decision trace: one row per user the engine considered for an event, with the targeting
-- rule and, per channel, the preference applied (with its source) and the outcome and reason.
CREATE TABLE event_recipients (
    organisation_id uuid NOT NULL,
    event_id        uuid NOT NULL,
    user_id         uuid NOT NULL,
    category_id     uuid NOT NULL,
    targeted        boolean NOT NULL,
    rule            text NOT NULL,
    reason          text NOT NULL,
    notified        boolean NOT NULL,
    channels        jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, event_id, user_id),
    FOREIGN KEY (organisation_id, event_id) REFERENCES events (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
-- The per-user, per-category throttle counts recent rows here.
CREATE INDEX event_recipients_throttle ON event_recipients (organisation_id, category_id, created_at) INCLUDE (user_id) WHERE notified;

ALTER TABLE categories ENABLE ROW LEVEL SECURITY;
ALTER TABLE categories FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON categories
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE notification_types ENABLE ROW LEVEL SECURITY;
ALTER TABLE notification_types FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notification_types
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE templates FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON templates
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE preference_defaults ENABLE ROW LEVEL SECURITY;
ALTER TABLE preference_defaults FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON preference_defaults
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE preferences ENABLE ROW LEVEL SECURITY;
ALTER TABLE preferences FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON preferences
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON events
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE notifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE notifications FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notifications
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
-- In-app rows are private to their recipient: the feed endpoints set app.recipient_id, and
-- then only that user's rows are visible or writable. Restrictive, so it narrows the tenant
-- policy, never widens it. (Engine and admin paths, which leave it unset, see the tenant's rows.)
CREATE POLICY recipient_only ON notifications AS RESTRICTIVE
    USING (nullif(current_setting('app.recipient_id', true), '') IS NULL
           OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid);
CREATE POLICY recipient_only ON feed_state AS RESTRICTIVE
    USING (nullif(current_setting('app.recipient_id', true), '') IS NULL
           OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid);

ALTER TABLE feed_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE feed_state FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON feed_state
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE deliveries ENABLE ROW LEVEL SECURITY;
ALTER TABLE deliveries FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON deliveries
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE digest_items ENABLE ROW LEVEL SECURITY;
ALTER TABLE digest_items FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON digest_items
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE event_recipients ENABLE ROW LEVEL SECURITY;
ALTER TABLE event_recipients FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON event_recipients
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

GRANT SELECT, INSERT, UPDATE, DELETE ON categories, notification_types, templates, preference_defaults,
    preferences, notifications, feed_state TO herald_app;
GRANT SELECT, INSERT, UPDATE ON events, deliveries, digest_items TO herald_app;
GRANT SELECT, INSERT ON event_recipients TO herald_app;
