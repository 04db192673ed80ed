-- The notification bus (issue 9): a user's feed announces its own changes, so live feed streams
-- and caches hear of them without polling. Each statement that changes feed rows sends ONE
-- pg_notify on channel herald_feed per (organisation, user, kind) it touched: "mark all read" of
-- 1000 rows is one message, not 1000. Statement-level triggers with transition tables do this.
-- The payload is compact JSON, about 110 bytes, far under the 8000-byte limit:
--   {"org": "<organisation id>", "kind": "read", "user": "<user id>"}
-- Kinds: read, unread, archived (an UPDATE of notifications), deleted (a DELETE: one row, a
-- cleared feed, an expiry purge, a cancelled event's future rows), all_read (the user's
-- "all read" watermark moved in feed_state). New rows are not announced here: notify already
-- announces each committed event on herald_events ('<organisation id>:<event id>').
-- Notifications are sent at commit, never for a rolled-back transaction, and PostgreSQL folds
-- identical ones of one transaction into one.

-- Which of read, unread and archived each updated row underwent. Unpinning alone (what "mark
-- all read" does to rows marked unread by hand) is not a kind of its own: it happens with the
-- watermark, which feed_state announces as all_read.
CREATE FUNCTION announce_feed_update() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM pg_notify('herald_feed', jsonb_build_object('org', c.organisation_id, 'user', c.user_id, 'kind', c.kind)::text)
    FROM (
        SELECT DISTINCT n.organisation_id, n.user_id, k.kind
        FROM changed_new n
        JOIN changed_old o ON o.organisation_id = n.organisation_id AND o.id = n.id
        CROSS JOIN LATERAL (VALUES
            (CASE WHEN o.read_at IS NULL AND n.read_at IS NOT NULL THEN 'read' END),
            (CASE WHEN NOT o.unread_pinned AND n.unread_pinned THEN 'unread' END),
            (CASE WHEN o.archived_at IS NULL AND n.archived_at IS NOT NULL THEN 'archived' END)
        ) AS k (kind)
        WHERE k.kind IS NOT NULL
    ) c;
    RETURN NULL;
END
$$;

CREATE FUNCTION announce_feed_delete() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM pg_notify('herald_feed', jsonb_build_object('org', c.organisation_id, 'user', c.user_id, 'kind', 'deleted')::text)
    FROM (SELECT DISTINCT organisation_id, user_id FROM changed_old) c;
    RETURN NULL;
END
$$;

CREATE FUNCTION announce_feed_watermark() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM pg_notify('herald_feed', jsonb_build_object('org', c.organisation_id, 'user', c.user_id, 'kind', 'all_read')::text)
    FROM (SELECT DISTINCT organisation_id, user_id FROM changed_new) c;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_announce_update AFTER UPDATE ON notifications
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION announce_feed_update();

CREATE TRIGGER notifications_announce_delete AFTER DELETE ON notifications
    REFERENCING OLD TABLE AS changed_old
    FOR EACH STATEMENT EXECUTE FUNCTION announce_feed_delete();

-- "Mark all read" upserts feed_state: the insert or the update fires, one message either way.
CREATE TRIGGER feed_state_announce_insert AFTER INSERT ON feed_state
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION announce_feed_watermark();

CREATE TRIGGER feed_state_announce_update AFTER UPDATE ON feed_state
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION announce_feed_watermark();
