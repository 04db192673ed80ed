-- A chunk of a large audience reads its own users once (issue 12: notify to 100 000 members).
--
-- Two costs measured on a scratch database (PostgreSQL 15, 2 cores, a group of 100 000 members,
-- the chunk of 10 000 after the 50 000th):
--
-- - audience_candidates bounded each source by `(p_after IS NULL OR user_id > p_after)`, which an
--   index cannot start from. In the plan PostgreSQL keeps for the function, a group's members
--   were read from the organisation's first user on (group_members_user, with the group as a
--   filter): 60 000 entries for that chunk, and for the last chunk of a million-member group a
--   million. Each source now starts at `CASE WHEN p_after IS NULL THEN the nil UUID ELSE p_after
--   END` as an index condition and drops p_after itself by filter, so a chunk reads its own
--   entries wherever it is. (Not `coalesce`: under row-level security PostgreSQL counts it as
--   leaky and keeps it out of the index condition; a CASE is not.)
-- - the chunk's read then asked, for each user, which of the audience's groups and roles they
--   hold: two index probes per user, after the sources had already said so. audience_members
--   returns each user with the sources that named it (explicitly, by which roles, by which
--   groups), and the read joins only the users' rows: 158 ms for that chunk before, 60 ms after,
--   measured with `EXPLAIN ANALYZE` of the statement `Events.recipientsQuery` runs.

-- Each source of an audience in user order from its own index, after p_after and cut at
-- p_limit users: one row per (source, user), with the role's or group's key.
CREATE FUNCTION audience_sources(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                 p_after uuid, p_limit integer)
    RETURNS TABLE (source text, key text, user_id uuid)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, public
AS $$
    (SELECT 'everyone', NULL::text, u.id FROM users u
     WHERE p_everyone AND u.organisation_id = p_organisation
       AND u.id >= CASE WHEN p_after IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE p_after END AND (p_after IS NULL OR u.id > p_after)
     ORDER BY u.id LIMIT p_limit)
    UNION ALL
    -- Only users that exist: an id counted here but dropped by the caller's join would make a
    -- chunk look shorter than its size, which ends a fan-out.
    SELECT 'user', NULL, x FROM unnest(p_users) x
    WHERE (p_after IS NULL OR x > p_after) AND EXISTS (SELECT 1 FROM users u WHERE u.organisation_id = p_organisation AND u.id = x)
    UNION ALL
    SELECT 'group', g.key, m.user_id FROM groups g
    CROSS JOIN LATERAL (
        SELECT gm.user_id FROM group_members gm
        WHERE gm.organisation_id = p_organisation AND gm.group_id = g.id
          AND gm.user_id >= CASE WHEN p_after IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE p_after END AND (p_after IS NULL OR gm.user_id > p_after)
        ORDER BY gm.user_id LIMIT p_limit) m
    WHERE g.organisation_id = p_organisation AND g.key = ANY(p_groups)
    UNION ALL
    SELECT 'role', r.key, h.user_id FROM roles r
    CROSS JOIN LATERAL (
        SELECT ur.user_id FROM user_roles ur
        WHERE ur.organisation_id = p_organisation AND ur.role_id = r.id
          AND ur.user_id >= CASE WHEN p_after IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE p_after END AND (p_after IS NULL OR ur.user_id > p_after)
        ORDER BY ur.user_id LIMIT p_limit) h
    WHERE r.organisation_id = p_organisation AND r.key = ANY(p_roles)
$$;
REVOKE ALL ON FUNCTION audience_sources(uuid, boolean, uuid[], text[], text[], uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audience_sources(uuid, boolean, uuid[], text[], text[], uuid, integer) TO herald_app;

-- A chunk's users, each with the sources that named it. Every user of a chunk is named by every
-- source that holds it: a source is cut at p_limit users in user order, and a user among the
-- first p_limit of the union has at most p_limit − 1 users before it in any one source.
CREATE FUNCTION audience_members(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                 p_after uuid, p_limit integer)
    RETURNS TABLE (user_id uuid, by_user boolean, role_keys text[], group_keys text[])
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, public
AS $$
    SELECT s.user_id, bool_or(s.source = 'user'),
           coalesce(array_agg(DISTINCT s.key ORDER BY s.key) FILTER (WHERE s.source = 'role'), '{}'),
           coalesce(array_agg(DISTINCT s.key ORDER BY s.key) FILTER (WHERE s.source = 'group'), '{}')
    FROM audience_sources(p_organisation, p_everyone, p_users, p_roles, p_groups, p_after, p_limit) s
    GROUP BY s.user_id
    ORDER BY s.user_id
    LIMIT p_limit
$$;
REVOKE ALL ON FUNCTION audience_members(uuid, boolean, uuid[], text[], text[], uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audience_members(uuid, boolean, uuid[], text[], text[], uuid, integer) TO herald_app;

-- The ids alone, as notify counts them (how many users an audience names, up to a limit).
CREATE OR REPLACE FUNCTION audience_candidates(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                               p_after uuid, p_limit integer)
    RETURNS TABLE (user_id uuid)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, public
AS $$
    SELECT DISTINCT s.user_id FROM audience_sources(p_organisation, p_everyone, p_users, p_roles, p_groups, p_after, p_limit) s
    ORDER BY s.user_id
    LIMIT p_limit
$$;
