-- The bell's two reads in one round trip each (issue 12: "feed reads in one round trip ... or one
-- SQL function per read that sets the context and returns the rows").
--
-- A read of the first page or of the unread count was four round trips: BEGIN, the entry
-- (enter_tenant_as_user: the tenant context and the caller's grant), the read, COMMIT. The server's
-- own work per round trip (a statement task, its deadline timer, the protocol) cost more than the
-- database's for the read. bell_first_page and bell_unread_count do the same in one statement, in
-- the implicit transaction of that statement:
--
-- 1. the tenant context (enter_tenant's SET LOCALs, which end with the statement's transaction);
-- 2. the caller's grant (user_grant): the read is answered only when the user is active, holds the
--    permission the server names (p_permission) and, for the page, has no engagement to record
--    (last engaged before p_engaged_since, or an inactivity warning pending: a feed read is
--    engagement, migration 0014);
-- 3. the read, through the same definitions the general path prepares (feed_first_page,
--    feed_unread_count below), so the two paths cannot drift apart.
--
-- When step 2 says no, the function returns ONE row of NULLs (a feed row's id and a count's category
-- are never NULL), and the server takes the general path, which answers 401 or 403 or writes the
-- engagement. An admitted read returns its rows (none for an empty feed or no unread row). Like the
-- entry functions these are SECURITY INVOKER: they run as the application role under row-level
-- security, and can read nothing the general path could not.

-- The first page of the default feed (unarchived, no filter), unread first, newest first within
-- each: FirstFeedPage's statement since 2026-12-03 (docs/decisions.md), as an SQL function the
-- planner inlines into its caller (one SELECT, STABLE, not strict), so a prepared
-- `SELECT * FROM feed_first_page(...)` keeps the same plan as the statement itself did.
-- $1 organisation, $2 user, $3 now, $4 rows to read.
CREATE FUNCTION feed_first_page(uuid, uuid, timestamptz, bigint)
    RETURNS TABLE (id uuid, event_id uuid, type_key text, category_key text, severity text, priority text, title text, body text,
        subject_type text, subject_id text, read boolean, archived boolean, visible_at timestamptz, expires_at timestamptz, tags text[])
    LANGUAGE sql STABLE
AS $$
WITH fs AS MATERIALIZED (
  SELECT f FROM feed_state f WHERE f.organisation_id = $1 AND f.user_id = $2
),
settled AS MATERIALIZED (
  SELECT coalesce((SELECT (f).read_settled FROM fs), '00000000-0000-0000-0000-000000000000'::uuid) AS id
),
unread AS MATERIALIZED (
  SELECT u.n FROM (
    (SELECT n FROM notifications n
     WHERE n.organisation_id = $1 AND n.user_id = $2 AND n.read_at IS NULL AND n.id > (SELECT id FROM settled)
       AND n.archived_at IS NULL AND n.visible_at <= $3 AND (n.expires_at IS NULL OR n.expires_at > $3)
       AND NOT notification_read(n, (SELECT f FROM fs))
     ORDER BY n.id DESC LIMIT $4)
    UNION ALL
    (SELECT n FROM notifications n
     WHERE n.organisation_id = $1 AND n.user_id = $2 AND n.unread_pinned AND NOT (n.read_at IS NULL AND n.id > (SELECT id FROM settled))
       AND n.archived_at IS NULL AND n.visible_at <= $3 AND (n.expires_at IS NULL OR n.expires_at > $3)
     ORDER BY n.id DESC LIMIT $4)
  ) u
  ORDER BY (u.n).id DESC LIMIT $4
),
read AS MATERIALIZED (
  SELECT n FROM notifications n
  WHERE (SELECT count(*) FROM unread) < $4
    AND n.organisation_id = $1 AND n.user_id = $2
    AND n.archived_at IS NULL AND n.visible_at <= $3 AND (n.expires_at IS NULL OR n.expires_at > $3)
    AND notification_read(n, (SELECT f FROM fs))
  ORDER BY n.id DESC LIMIT $4
),
page AS (
  SELECT n, false AS read FROM unread UNION ALL SELECT n, true FROM read
)
SELECT (p.n).id, (p.n).event_id, t.key AS type_key, c.key AS category_key, (p.n).severity, (p.n).priority, coalesce((p.n).title, nc.title),
       coalesce((p.n).body, nc.body), e.subject_type, e.subject_id, p.read, (p.n).archived_at IS NOT NULL AS archived, (p.n).visible_at,
       (p.n).expires_at, e.tags
FROM page p
JOIN notification_contents nc ON nc.organisation_id = $1 AND nc.id = (p.n).content_id
JOIN events e ON e.organisation_id = $1 AND e.id = (p.n).event_id
JOIN notification_types t ON t.organisation_id = $1 AND t.id = (p.n).type_id
JOIN categories c ON c.organisation_id = $1 AND c.id = (p.n).category_id
ORDER BY p.read, (p.n).id DESC
LIMIT $4
$$;

-- The unread count per category (UnreadCountByCategory's statement). $1 organisation, $2 user, $3 now.
CREATE FUNCTION feed_unread_count(uuid, uuid, timestamptz)
    RETURNS TABLE (category_key text, unread integer)
    LANGUAGE sql STABLE
AS $$
SELECT c.key, count(*)::int FROM notifications n
JOIN categories c ON c.organisation_id = n.organisation_id AND c.id = n.category_id
LEFT JOIN feed_state fs ON fs.organisation_id = n.organisation_id AND fs.user_id = n.user_id
WHERE n.organisation_id = $1 AND n.user_id = $2 AND n.read_at IS NULL AND n.archived_at IS NULL
  AND n.visible_at <= $3 AND (n.expires_at IS NULL OR n.expires_at > $3)
  AND (n.unread_pinned OR n.id > coalesce((SELECT read_settled FROM feed_state WHERE organisation_id = $1 AND user_id = $2), '00000000-0000-0000-0000-000000000000'))
  AND NOT notification_read(n, fs)
GROUP BY c.key
$$;

-- Steps 1 and 2 of both functions: the tenant context, then whether the caller's grant lets the
-- read be answered here. p_engaged_since NULL: no engagement to look at (the count).
CREATE FUNCTION bell_admits(p_organisation uuid, p_user uuid, p_permission text, p_engaged_since timestamptz)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    g record;
BEGIN
    PERFORM enter_tenant(p_organisation, p_user);
    SELECT * INTO g FROM user_grant(p_organisation, p_user);
    -- Never NULL: a NULL would read as "not refused" to the caller's IF NOT.
    RETURN coalesce(FOUND AND g.active AND p_permission = ANY (g.permissions)
        AND (p_engaged_since IS NULL OR (NOT g.warned AND g.last_engaged_at >= p_engaged_since)), false);
END
$$;

CREATE FUNCTION bell_first_page(p_organisation uuid, p_user uuid, p_now timestamptz, p_limit bigint,
                                p_permission text, p_engaged_since timestamptz)
    RETURNS TABLE (id uuid, event_id uuid, type_key text, category_key text, severity text, priority text, title text, body text,
        subject_type text, subject_id text, read boolean, archived boolean, visible_at timestamptz, expires_at timestamptz, tags text[])
    LANGUAGE plpgsql VOLATILE
    -- The page's plan is the same whatever the bind values: PL/pgSQL's plan cache otherwise kept
    -- planning it per call (the generic plan's estimate, not knowing the page's size, lost to the
    -- custom one), 4–5 ms of planning for 1 ms of execution once the feed held 100 000 rows (pgbench
    -- of this function: 860 tps with the default, 2 934 with the generic plan). The count keeps the
    -- default.
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF NOT bell_admits(p_organisation, p_user, p_permission, p_engaged_since) THEN
        RETURN NEXT;
        RETURN;
    END IF;
    RETURN QUERY SELECT f.* FROM feed_first_page(p_organisation, p_user, p_now, p_limit) f;
END
$$;

CREATE FUNCTION bell_unread_count(p_organisation uuid, p_user uuid, p_now timestamptz, p_permission text)
    RETURNS TABLE (category_key text, unread integer)
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF NOT bell_admits(p_organisation, p_user, p_permission, NULL) THEN
        RETURN NEXT;
        RETURN;
    END IF;
    RETURN QUERY SELECT f.* FROM feed_unread_count(p_organisation, p_user, p_now) f;
END
$$;

GRANT EXECUTE ON FUNCTION feed_first_page(uuid, uuid, timestamptz, bigint), feed_unread_count(uuid, uuid, timestamptz),
    bell_admits(uuid, uuid, text, timestamptz),
    bell_first_page(uuid, uuid, timestamptz, bigint, text, timestamptz), bell_unread_count(uuid, uuid, timestamptz, text)
    TO herald_app, herald_worker;
