-- The audience's functions keep their plans (issue 12: fairness, and every small notify).
--
-- audience_sources, audience_members and audience_candidates (0035) were SQL functions with a
-- SET clause, which PostgreSQL neither inlines nor keeps a plan for: each call planned the
-- function's body again, and audience_members and audience_candidates planned audience_sources
-- inside them, each source a union of four queries under row-level security. A notify to one
-- user runs both (the count, then the chunk's users): `pg_stat_statements` in make bench's
-- fairness section put each at 0.86 ms a call, the largest two statements of a small notify,
-- and on a scratch database the count of a one-user audience took 0.80 ms against 0.28 ms for
-- the same lookup written as one statement.
--
-- The same queries in PL/pgSQL, which each session plans once and keeps. The plan kept is the
-- generic one (plan_cache_mode = force_generic_plan), planned without the parameters' values:
-- the plan the SQL functions were planned to on every call, since their bodies were never planned
-- with the values either, so every plan 0035 measured and PlanGuardTests checks is unchanged.
-- (Left to choose, PL/pgSQL plans the first five calls with their values, 0.8 ms each here, before
-- settling.) Measured the same way after: 0.25 ms the count. The SET clauses are repeated:
-- CREATE OR REPLACE would drop them. Columns are qualified; #variable_conflict guards the output
-- columns' names.
CREATE OR REPLACE FUNCTION audience_sources(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                            p_after uuid, p_limit integer)
    RETURNS TABLE (source text, key text, user_id uuid)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, public
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    (SELECT 'everyone'::text, NULL::text, u.id FROM public.users u
     WHERE p_everyone AND u.organisation_id = p_organisation
       AND u.id >= CASE WHEN p_after IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE p_after END AND (p_after IS NULL OR u.id > p_after)
     ORDER BY u.id LIMIT p_limit)
    UNION ALL
    -- Only users that exist: an id counted here but dropped by the caller's join would make a
    -- chunk look shorter than its size, which ends a fan-out.
    SELECT 'user'::text, NULL::text, x FROM unnest(p_users) x
    WHERE (p_after IS NULL OR x > p_after) AND EXISTS (SELECT 1 FROM public.users u WHERE u.organisation_id = p_organisation AND u.id = x)
    UNION ALL
    SELECT 'group'::text, g.key, m.user_id FROM public.groups g
    CROSS JOIN LATERAL (
        SELECT gm.user_id FROM public.group_members gm
        WHERE gm.organisation_id = p_organisation AND gm.group_id = g.id
          AND gm.user_id >= CASE WHEN p_after IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE p_after END AND (p_after IS NULL OR gm.user_id > p_after)
        ORDER BY gm.user_id LIMIT p_limit) m
    WHERE g.organisation_id = p_organisation AND g.key = ANY(p_groups)
    UNION ALL
    SELECT 'role'::text, r.key, h.user_id FROM public.roles r
    CROSS JOIN LATERAL (
        SELECT ur.user_id FROM public.user_roles ur
        WHERE ur.organisation_id = p_organisation AND ur.role_id = r.id
          AND ur.user_id >= CASE WHEN p_after IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE p_after END AND (p_after IS NULL OR ur.user_id > p_after)
        ORDER BY ur.user_id LIMIT p_limit) h
    WHERE r.organisation_id = p_organisation AND r.key = ANY(p_roles);
END
$$;

CREATE OR REPLACE FUNCTION audience_members(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                            p_after uuid, p_limit integer)
    RETURNS TABLE (user_id uuid, by_user boolean, role_keys text[], group_keys text[])
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, public
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.user_id, bool_or(s.source = 'user'),
           coalesce(array_agg(DISTINCT s.key ORDER BY s.key) FILTER (WHERE s.source = 'role'), '{}'),
           coalesce(array_agg(DISTINCT s.key ORDER BY s.key) FILTER (WHERE s.source = 'group'), '{}')
    FROM public.audience_sources(p_organisation, p_everyone, p_users, p_roles, p_groups, p_after, p_limit) s
    GROUP BY s.user_id
    ORDER BY s.user_id
    LIMIT p_limit;
END
$$;

CREATE OR REPLACE FUNCTION audience_candidates(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                               p_after uuid, p_limit integer)
    RETURNS TABLE (user_id uuid)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, public
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT DISTINCT s.user_id FROM public.audience_sources(p_organisation, p_everyone, p_users, p_roles, p_groups, p_after, p_limit) s
    ORDER BY s.user_id
    LIMIT p_limit;
END
$$;
