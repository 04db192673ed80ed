-- The first page's functions with the event's link under names of their own (`_v2`), and the
-- 0031 functions back as they were, for the builds before 0047 that still run during a rolling
-- upgrade.
--
-- 0047 changed feed_first_page and bell_first_page in place (one more column, `url`). A server of
-- the build before keeps them as named prepared statements on its pooled connections; replanned
-- after the change, such a statement fails with "cached plan must not change result type", so
-- every bell read of an instance not yet restarted would have been a 500 from `herald migrate`
-- until its restart (found by this stop's review). Now the old names return what they returned
-- before (a statement prepared before 0047 plans again to the same result type), and this build
-- calls the `_v2` functions. The old functions can be dropped once no build before this one runs.

DROP FUNCTION bell_first_page(uuid, uuid, timestamptz, bigint, text, timestamptz);
DROP FUNCTION feed_first_page(uuid, uuid, timestamptz, bigint);

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

CREATE FUNCTION feed_first_page_v2(uuid, uuid, timestamptz, bigint)
    RETURNS TABLE (id uuid, event_id uuid, type_key text, category_key text, severity text, priority text, title text, body text,
        subject_type text, subject_id text, read boolean, archived boolean, visible_at timestamptz, expires_at timestamptz, tags text[],
        url text)
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
       (p.n).expires_at, e.tags, e.url
FROM page p
JOIN notification_contents nc ON nc.organisation_id = $1 AND nc.id = (p.n).content_id
JOIN events e ON e.organisation_id = $1 AND e.id = (p.n).event_id
JOIN notification_types t ON t.organisation_id = $1 AND t.id = (p.n).type_id
JOIN categories c ON c.organisation_id = $1 AND c.id = (p.n).category_id
ORDER BY p.read, (p.n).id DESC
LIMIT $4
$$;

CREATE FUNCTION bell_first_page_v2(p_organisation uuid, p_user uuid, p_now timestamptz, p_limit bigint,
                                p_permission text, p_engaged_since timestamptz)
    RETURNS TABLE (id uuid, event_id uuid, type_key text, category_key text, severity text, priority text, title text, body text,
        subject_type text, subject_id text, read boolean, archived boolean, visible_at timestamptz, expires_at timestamptz, tags text[],
        url text)
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
    RETURN QUERY SELECT f.* FROM feed_first_page_v2(p_organisation, p_user, p_now, p_limit) f;
END
$$;

GRANT EXECUTE ON FUNCTION feed_first_page(uuid, uuid, timestamptz, bigint),
    bell_first_page(uuid, uuid, timestamptz, bigint, text, timestamptz),
    feed_first_page_v2(uuid, uuid, timestamptz, bigint),
    bell_first_page_v2(uuid, uuid, timestamptz, bigint, text, timestamptz)
    TO herald_app, herald_worker;
