-- Foundation: organisations, users, roles and permissions, groups, API keys, refresh tokens,
-- audit log. Every tenant table carries organisation_id, has row-level security enabled and
-- forced, and one policy on the tenant context set per transaction by the store:
--     organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
-- With no context set, the policy compares with NULL and every query sees zero rows.
-- Keys are (organisation_id, id) and foreign keys are composite, so no row can point into
-- another organisation. Indexes lead with organisation_id.

CREATE TABLE organisations (
    id               uuid PRIMARY KEY,
    slug             text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    default_locale   text NOT NULL DEFAULT 'en',
    default_timezone text NOT NULL DEFAULT 'UTC',
    settings         jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(settings) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE organisations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organisations FORCE ROW LEVEL SECURITY;
-- The organisation row is its own tenant: its id is the organisation id.
CREATE POLICY tenant_isolation ON organisations
    USING (id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (id = nullif(current_setting('app.org_id', true), '')::uuid);

CREATE TABLE users (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    email           text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    display_name    text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    locale          text,
    timezone        text,
    active          boolean NOT NULL DEFAULT true,
    attributes      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(attributes) = 'object'),
    password_hash   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deactivated_at  timestamptz,
    PRIMARY KEY (organisation_id, id)
);
CREATE UNIQUE INDEX users_email ON users (organisation_id, lower(email));
CREATE INDEX users_created ON users (organisation_id, created_at, id);

CREATE TABLE roles (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    key             text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9_-]{1,63}$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description     text NOT NULL DEFAULT '',
    builtin         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    UNIQUE (organisation_id, key)
);

CREATE TABLE role_permissions (
    organisation_id uuid NOT NULL,
    role_id         uuid NOT NULL,
    permission      text NOT NULL CHECK (permission ~ '^[a-z]+\.[a-z]+$'),
    PRIMARY KEY (organisation_id, role_id, permission),
    FOREIGN KEY (organisation_id, role_id) REFERENCES roles (organisation_id, id) ON DELETE CASCADE
);

CREATE TABLE user_roles (
    organisation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    role_id         uuid NOT NULL,
    granted_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, user_id, role_id),
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, role_id) REFERENCES roles (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX user_roles_role ON user_roles (organisation_id, role_id);

CREATE TABLE groups (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    key             text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9_-]{1,63}$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description     text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, id),
    UNIQUE (organisation_id, key)
);
CREATE INDEX groups_created ON groups (organisation_id, created_at, id);

CREATE TABLE group_members (
    organisation_id uuid NOT NULL,
    group_id        uuid NOT NULL,
    user_id         uuid NOT NULL,
    added_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organisation_id, group_id, user_id),
    FOREIGN KEY (organisation_id, group_id) REFERENCES groups (organisation_id, id) ON DELETE CASCADE,
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX group_members_user ON group_members (organisation_id, user_id);

CREATE TABLE api_keys (
    organisation_id    uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id                 uuid NOT NULL DEFAULT gen_random_uuid(),
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role_id            uuid NOT NULL,
    secret_hash        bytea NOT NULL,
    created_by_user_id uuid,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_used_at       timestamptz,
    expires_at         timestamptz,
    revoked_at         timestamptz,
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, role_id) REFERENCES roles (organisation_id, id),
    FOREIGN KEY (organisation_id, created_by_user_id) REFERENCES users (organisation_id, id) ON DELETE SET NULL (created_by_user_id)
);
CREATE INDEX api_keys_role ON api_keys (organisation_id, role_id);

-- One row per refresh token. A login starts a family; each refresh uses one token and issues
-- its successor in the same family. A token presented twice revokes the whole family.
CREATE TABLE refresh_tokens (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL,
    family_id       uuid NOT NULL,
    user_id         uuid NOT NULL,
    secret_hash     bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    revoked_at      timestamptz,
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (organisation_id, family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (organisation_id, user_id);

-- Append-only for the application role (see the grants below): who changed what, when,
-- with the state before and after.
CREATE TABLE audit_log (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    occurred_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor_type      text NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id        uuid,
    action          text NOT NULL,
    target_type     text NOT NULL,
    target_id       text,
    before          jsonb,
    after           jsonb,
    request_id      text,
    PRIMARY KEY (organisation_id, id)
);
CREATE INDEX audit_log_time ON audit_log (organisation_id, occurred_at DESC, id DESC);
CREATE INDEX audit_log_target ON audit_log (organisation_id, target_id, occurred_at DESC);

-- Row-level security on every tenant table: enabled, forced (the owner too), one policy each.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE roles FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON roles
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE role_permissions ENABLE ROW LEVEL SECURITY;
ALTER TABLE role_permissions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON role_permissions
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE user_roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE user_roles FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON user_roles
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE groups ENABLE ROW LEVEL SECURITY;
ALTER TABLE groups FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON groups
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE group_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE group_members FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON group_members
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE refresh_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE refresh_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON refresh_tokens
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_log
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

-- Login names an organisation by slug before any tenant context exists. This function is the
-- one narrow path from a slug to an id: it runs as the owner, through a SELECT-only policy
-- that applies to the owner alone, and returns nothing but the id.
CREATE POLICY owner_resolves_slug ON organisations FOR SELECT TO CURRENT_USER USING (true);
CREATE FUNCTION organisation_id_for_slug(p_slug text) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$ SELECT id FROM public.organisations WHERE slug = p_slug $$;
REVOKE ALL ON FUNCTION organisation_id_for_slug(text) FROM PUBLIC;

-- The application role: data access only, and only through the policies above.
GRANT USAGE ON SCHEMA public TO herald_app;
GRANT SELECT, INSERT, UPDATE ON organisations TO herald_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON users, roles, role_permissions, user_roles, groups,
    group_members, api_keys, refresh_tokens TO herald_app;
GRANT SELECT, INSERT ON audit_log TO herald_app;
GRANT EXECUTE ON FUNCTION organisation_id_for_slug(text) TO herald_app;
