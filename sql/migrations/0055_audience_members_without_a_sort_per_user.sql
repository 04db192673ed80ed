-- A fan-out chunk's audience is tagged without a sort per user (issue 12: the fan-out's cost per
-- recipient).
--
-- audience_members (0036) gathered each user's role and group keys with
-- array_agg(DISTINCT s.key ORDER BY s.key): PostgreSQL 15 starts a sort for every group of such an
-- aggregate, so a chunk of 10 000 users ran 20 000 small sorts. Measured on the bench database (a
-- group of 100 000, chunks of 10 000, as the application role): 13.3 ms a chunk against 4.4 ms
-- when the sources are sorted once by (user, key) and aggregated in that order. The keys need no
-- DISTINCT: a role or group is named once by its key (unique in the organisation), and a user is
-- in it at most once (the primary keys of user_roles and group_members), so each (source, key,
-- user) comes at most once. array_agg keeps the order of its input, which the sorted subquery
-- gives; the arrays are the same as before, in key order.
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
           coalesce(array_agg(s.key) FILTER (WHERE s.source = 'role'), '{}'),
           coalesce(array_agg(s.key) FILTER (WHERE s.source = 'group'), '{}')
    FROM (SELECT a.user_id, a.source, a.key
          FROM public.audience_sources(p_organisation, p_everyone, p_users, p_roles, p_groups, p_after, p_limit) a
          ORDER BY a.user_id, a.key) s
    GROUP BY s.user_id
    ORDER BY s.user_id
    LIMIT p_limit;
END
$$;
