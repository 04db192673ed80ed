-- Entering a tenant transaction in one round trip (issue 9: the request boundary's "clear gain";
-- issue 12: a feed read in fewer round trips).
--
-- A request's transaction used to start BEGIN, SET LOCAL app.org_id, SET LOCAL
-- app.recipient_id (the feed), then the caller's grant: four round trips before the handler's
-- first statement. These functions run the same SET LOCALs (so the context still reaches the
-- worker nodes of a distributed PostgreSQL, which set_config(..., true) does not) and, for a
-- request, read the caller's grant in the same statement: BEGIN, one call, the handler,
-- COMMIT.
--
-- A SET LOCAL run inside a function outlives the call (the function has no SET clause for the
-- setting), to the end of the transaction, exactly as if the client had sent it. The functions
-- are SECURITY INVOKER: they can do nothing the application role could not do with the same
-- statements, and the grant reads run under the row-level security the context has just set.

-- The grant of a user: whether they are active and the permissions of their roles; with it,
-- when they last engaged and whether an inactivity warning is pending, so that a feed read
-- writes its engagement (migration 0014) only when there is something to write.
CREATE FUNCTION user_grant(p_organisation uuid, p_user uuid)
    RETURNS TABLE (active boolean, permissions text[], last_engaged_at timestamptz, warned boolean)
    LANGUAGE sql STABLE
AS $$
    SELECT u.active,
           coalesce((SELECT array_agg(DISTINCT p.permission) FROM user_roles ur
                     JOIN role_permissions p ON p.organisation_id = ur.organisation_id AND p.role_id = ur.role_id
                     WHERE ur.organisation_id = u.organisation_id AND ur.user_id = u.id), '{}'),
           u.last_engaged_at, u.inactivity_warned_at IS NOT NULL
    FROM users u WHERE u.organisation_id = p_organisation AND u.id = p_user
$$;

-- The grant of an API key: its secret's hash (compared by the caller in constant time), its
-- expiry and revocation, and its role's permissions.
CREATE FUNCTION api_key_grant(p_organisation uuid, p_key uuid)
    RETURNS TABLE (secret_hash bytea, expires_at timestamptz, revoked_at timestamptz, permissions text[])
    LANGUAGE sql STABLE
AS $$
    SELECT k.secret_hash, k.expires_at, k.revoked_at,
           coalesce((SELECT array_agg(p.permission) FROM role_permissions p
                     WHERE p.organisation_id = k.organisation_id AND p.role_id = k.role_id), '{}')
    FROM api_keys k WHERE k.organisation_id = p_organisation AND k.id = p_key
$$;

-- The tenant context for the rest of the transaction: the organisation and, for a feed, the
-- one user whose in-app rows it may see.
CREATE FUNCTION enter_tenant(p_organisation uuid, p_recipient uuid)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    EXECUTE format('SET LOCAL app.org_id = %L', p_organisation);
    IF p_recipient IS NOT NULL THEN
        EXECUTE format('SET LOCAL app.recipient_id = %L', p_recipient);
    END IF;
END
$$;

-- The context, then the grant of the user calling.
CREATE FUNCTION enter_tenant_as_user(p_organisation uuid, p_recipient uuid, p_user uuid)
    RETURNS TABLE (active boolean, permissions text[], last_engaged_at timestamptz, warned boolean)
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM enter_tenant(p_organisation, p_recipient);
    RETURN QUERY SELECT g.active, g.permissions, g.last_engaged_at, g.warned FROM user_grant(p_organisation, p_user) g;
END
$$;

-- The context, then the grant of the API key calling.
CREATE FUNCTION enter_tenant_as_api_key(p_organisation uuid, p_key uuid)
    RETURNS TABLE (secret_hash bytea, expires_at timestamptz, revoked_at timestamptz, permissions text[])
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM enter_tenant(p_organisation, NULL);
    RETURN QUERY SELECT g.secret_hash, g.expires_at, g.revoked_at, g.permissions FROM api_key_grant(p_organisation, p_key) g;
END
$$;

GRANT EXECUTE ON FUNCTION user_grant(uuid, uuid), api_key_grant(uuid, uuid), enter_tenant(uuid, uuid),
    enter_tenant_as_user(uuid, uuid, uuid), enter_tenant_as_api_key(uuid, uuid) TO herald_app, herald_worker;
