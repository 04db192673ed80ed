-- Issue 12 (a small request's round trips): every request made with an API key sent
-- "UPDATE api_keys SET last_used_at ... WHERE last_used_at < now - 1 minute", which changes the
-- row at most once a minute but was a statement of every request.
--
-- The entry of a request made with a key (0017) now also returns when the key was last marked
-- used, so the server sends the mark only when it is due. New functions rather than a changed
-- return type: an instance of the previous release, still serving during a rolling upgrade,
-- keeps calling enter_tenant_as_api_key and api_key_grant as they are.
CREATE FUNCTION api_key_grant_with_use(p_organisation uuid, p_key uuid)
    RETURNS TABLE (secret_hash bytea, expires_at timestamptz, revoked_at timestamptz, permissions text[], last_used_at timestamptz)
    LANGUAGE sql STABLE
AS $$
    SELECT k.secret_hash, k.expires_at, k.revoked_at,
           coalesce((SELECT array_agg(p.permission) FROM role_permissions p
                     WHERE p.organisation_id = k.organisation_id AND p.role_id = k.role_id), '{}'),
           k.last_used_at
    FROM api_keys k WHERE k.organisation_id = p_organisation AND k.id = p_key
$$;

CREATE FUNCTION enter_tenant_with_api_key(p_organisation uuid, p_key uuid)
    RETURNS TABLE (secret_hash bytea, expires_at timestamptz, revoked_at timestamptz, permissions text[], last_used_at timestamptz)
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM enter_tenant(p_organisation, NULL);
    RETURN QUERY SELECT g.secret_hash, g.expires_at, g.revoked_at, g.permissions, g.last_used_at
                 FROM api_key_grant_with_use(p_organisation, p_key) g;
END
$$;

GRANT EXECUTE ON FUNCTION api_key_grant_with_use(uuid, uuid), enter_tenant_with_api_key(uuid, uuid) TO herald_app, herald_worker;
