-- Live feed streams (issue 10): every change to a user's feed gets a number that increases per
-- user, so a stream can say "everything after 41" and a reconnecting client can ask for exactly
-- what it missed.
--
-- feed_streams holds each user's last number. A statement that changes the feed takes the next
-- numbers by bumping that row (INSERT … ON CONFLICT DO UPDATE), which locks it until the
-- transaction ends: a second writer for the same user waits, so numbers become visible in the
-- order they were given. A reader that has seen n has therefore seen every committed change up to
-- n, and any change still to commit will be numbered above n: no change is skipped by a client
-- that resumes from n. (A global sequence would not do: transactions commit out of the order
-- they drew numbers, and a reader would pass over a number still being written.)
--
-- feed_changes is the log a stream reads: (user, number, kind, notification). It says what
-- changed, not how the row looks; a stream reads the row's current state when it sends. Kinds:
--   created   a row went on show (through feed_due: just after its notify committed, or at deliver_at)
--   read, unread, archived     an UPDATE of one or more rows
--   deleted   a visible row was deleted; expired rows leave as 'expired' first and are not
--             logged again when purged; future rows of a cancelled event were never shown
--   cleared   a DELETE left the user no visible row (clear the feed): one change, not one per row
--   expired   a row's expires_at passed (through feed_due)
--   read_all  the "all read" watermark moved (feed_state)
-- Changes older than the retention window are removed by feed_stream_sweep(); feed_streams keeps
-- purged_through so that a client asking for something older is told to resynchronise.
--
-- Each statement that logs changes sends pg_notify on herald_stream, one message per organisation
-- and up to 150 users: {"org": "…", "users": ["…", …]} (about 5.7 kB, under the 8000-byte limit).
-- A notify to 10 000 members is 67 messages, not 10 000. The same channel says when a user is
-- deactivated ({"org", "deactivated": user}) or a session is revoked ({"org", "session": family}),
-- so the streams they hold end.

CREATE TABLE feed_streams (
    organisation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    seq             bigint NOT NULL DEFAULT 0,
    purged_through  bigint NOT NULL DEFAULT 0,
    CONSTRAINT feed_streams_pkey PRIMARY KEY (organisation_id, user_id),
    CONSTRAINT feed_streams_user_id_fk FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);

CREATE TABLE feed_changes (
    organisation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    seq             bigint NOT NULL,
    kind            text NOT NULL,
    notification_id uuid,
    -- When the statement logged it (clock_timestamp(), near its commit): streams measure their
    -- push latency from here.
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT feed_changes_pkey PRIMARY KEY (organisation_id, user_id, seq),
    CONSTRAINT feed_changes_kind_valid CHECK (kind IN ('created', 'read', 'unread', 'archived', 'deleted', 'cleared', 'expired', 'read_all')),
    CONSTRAINT feed_changes_user_id_fk FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
-- The retention sweep finds old changes across organisations (a *_claim index, like the
-- outbox's: the one cross-organisation path, through a SECURITY DEFINER function).
CREATE INDEX feed_changes_purge_claim ON feed_changes (created_at);

-- Moments a row's feed changes without a statement: it becomes visible (deliver_at) or expires.
CREATE TABLE feed_due (
    organisation_id uuid NOT NULL,
    notification_id uuid NOT NULL,
    kind            text NOT NULL,
    user_id         uuid NOT NULL,
    due_at          timestamptz NOT NULL,
    CONSTRAINT feed_due_pkey PRIMARY KEY (organisation_id, notification_id, kind),
    CONSTRAINT feed_due_kind_valid CHECK (kind IN ('created', 'expired')),
    CONSTRAINT feed_due_notification_id_fk FOREIGN KEY (organisation_id, notification_id) REFERENCES notifications (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX feed_due_claim ON feed_due (due_at);

-- Single-use tickets for clients that cannot send a header (EventSource, WebSocket in a
-- browser): about 60 s, bound to the user and the session (refresh-token family) that asked.
CREATE TABLE stream_tickets (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL,
    user_id         uuid NOT NULL,
    session_id      uuid,
    secret_hash     bytea NOT NULL,
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    CONSTRAINT stream_tickets_pkey PRIMARY KEY (organisation_id, id),
    CONSTRAINT stream_tickets_user_id_fk FOREIGN KEY (organisation_id, user_id) REFERENCES users (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX stream_tickets_purge_claim ON stream_tickets (expires_at);

-- Same rules as the feed: the tenant's rows, and with a recipient set only that user's.
ALTER TABLE feed_streams ENABLE ROW LEVEL SECURITY;
ALTER TABLE feed_streams FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON feed_streams
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
           AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid))
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
                AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                     OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid));

ALTER TABLE feed_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE feed_changes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON feed_changes
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
           AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid))
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid
                AND (coalesce(current_setting('app.recipient_id', true), '') = ''
                     OR user_id = nullif(current_setting('app.recipient_id', true), '')::uuid));

ALTER TABLE feed_due ENABLE ROW LEVEL SECURITY;
ALTER TABLE feed_due FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON feed_due
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

ALTER TABLE stream_tickets ENABLE ROW LEVEL SECURITY;
ALTER TABLE stream_tickets FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON stream_tickets
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);

-- The sweep crosses organisations like claim_deliveries(): owner-only policies that hold while
-- herald.sweeping is on, which only feed_stream_sweep() switches on for its own duration.
CREATE POLICY owner_sweeps ON feed_streams TO CURRENT_USER
    USING (current_setting('herald.sweeping', true) = 'on') WITH CHECK (current_setting('herald.sweeping', true) = 'on');
CREATE POLICY owner_sweeps ON feed_changes TO CURRENT_USER
    USING (current_setting('herald.sweeping', true) = 'on') WITH CHECK (current_setting('herald.sweeping', true) = 'on');
CREATE POLICY owner_sweeps ON feed_due TO CURRENT_USER
    USING (current_setting('herald.sweeping', true) = 'on') WITH CHECK (current_setting('herald.sweeping', true) = 'on');
CREATE POLICY owner_sweeps ON stream_tickets TO CURRENT_USER
    USING (current_setting('herald.sweeping', true) = 'on') WITH CHECK (current_setting('herald.sweeping', true) = 'on');

GRANT SELECT, INSERT, UPDATE ON feed_streams TO herald_app, herald_worker;
GRANT SELECT, INSERT ON feed_changes TO herald_app, herald_worker;
GRANT SELECT, INSERT, DELETE ON feed_due TO herald_app, herald_worker;
GRANT SELECT, INSERT, UPDATE ON stream_tickets TO herald_app;

-- Logs one change per array position, numbering each user's changes after their last number,
-- and announces the users on herald_stream. Users are bumped in (organisation, user) order, so
-- two fan-outs over the same members lock them in the same order and cannot deadlock.
-- SECURITY INVOKER: it writes under the caller's policies (the tenant's, or the sweep's).
CREATE FUNCTION log_feed_changes(p_organisations uuid[], p_users uuid[], p_kinds text[], p_notifications uuid[])
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF coalesce(cardinality(p_users), 0) = 0 THEN
        RETURN;
    END IF;
    WITH c AS (
        SELECT x.organisation_id, x.user_id, x.kind, x.notification_id,
               row_number() OVER (PARTITION BY x.organisation_id, x.user_id ORDER BY x.position) AS n,
               count(*) OVER (PARTITION BY x.organisation_id, x.user_id) AS total
        FROM unnest(p_organisations, p_users, p_kinds, p_notifications) WITH ORDINALITY AS x (organisation_id, user_id, kind, notification_id, position)
    ),
    bumped AS (
        INSERT INTO public.feed_streams AS s (organisation_id, user_id, seq)
        SELECT organisation_id, user_id, count(*) FROM c GROUP BY organisation_id, user_id ORDER BY organisation_id, user_id
        ON CONFLICT (organisation_id, user_id) DO UPDATE SET seq = s.seq + excluded.seq
        RETURNING s.organisation_id, s.user_id, s.seq
    )
    INSERT INTO public.feed_changes (organisation_id, user_id, seq, kind, notification_id, created_at)
    SELECT c.organisation_id, c.user_id, b.seq - c.total + c.n, c.kind, c.notification_id, clock_timestamp()
    FROM c JOIN bumped b ON b.organisation_id = c.organisation_id AND b.user_id = c.user_id;

    PERFORM pg_notify('herald_stream', jsonb_build_object('org', g.organisation_id, 'users', g.users)::text)
    FROM (
        SELECT u.organisation_id, jsonb_agg(u.user_id) AS users
        FROM (
            SELECT d.organisation_id, d.user_id,
                   (row_number() OVER (PARTITION BY d.organisation_id ORDER BY d.user_id) - 1) / 150 AS chunk
            FROM (SELECT DISTINCT organisation_id, user_id FROM unnest(p_organisations, p_users) AS x (organisation_id, user_id)) d
        ) u
        GROUP BY u.organisation_id, u.chunk
    ) g;
END
$$;

-- New rows are not numbered by notify itself: each goes to feed_due, due at visible_at (now, or
-- its deliver_at), and feed_stream_sweep() numbers it in a short transaction of its own, at once
-- when the bus announces the notify's commit, else within a second. Numbering inside notify would
-- hold every recipient's feed_streams row locked until a fan-out commits (seconds at 100 000
-- members): "mark all read" and every other change of those users would wait for it.
-- Expiring rows are also due at expires_at.
CREATE FUNCTION log_feed_insert() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    INSERT INTO public.feed_due (organisation_id, notification_id, kind, user_id, due_at)
    SELECT organisation_id, id, 'created', user_id, visible_at FROM added
    UNION ALL
    SELECT organisation_id, id, 'expired', user_id, expires_at FROM added WHERE expires_at IS NOT NULL;
    RETURN NULL;
END
$$;

-- Updated rows: one change per row and kind (read, unread, archived), as 0008 announces them.
-- (The feed's statements only touch rows on show, so every updated row was announced.)
CREATE FUNCTION log_feed_update() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM log_feed_changes(array_agg(c.organisation_id ORDER BY c.organisation_id, c.user_id, c.id),
                             array_agg(c.user_id ORDER BY c.organisation_id, c.user_id, c.id),
                             array_agg(c.kind ORDER BY c.organisation_id, c.user_id, c.id),
                             array_agg(c.id ORDER BY c.organisation_id, c.user_id, c.id))
    FROM (
        SELECT n.organisation_id, n.user_id, n.id, k.kind
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

-- Deleted rows that were on show (visible, not expired): 'cleared' when the user has no visible
-- row left, else one 'deleted' per row.
CREATE FUNCTION log_feed_delete() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM log_feed_changes(array_agg(c.organisation_id ORDER BY c.organisation_id, c.user_id, c.id),
                             array_agg(c.user_id ORDER BY c.organisation_id, c.user_id, c.id),
                             array_agg(c.kind ORDER BY c.organisation_id, c.user_id, c.id),
                             array_agg(c.id ORDER BY c.organisation_id, c.user_id, c.id))
    FROM (
        SELECT o.organisation_id, o.user_id, o.id, 'deleted' AS kind
        FROM removed o
        WHERE o.visible_at <= now() + interval '1 second' AND (o.expires_at IS NULL OR o.expires_at > now())
          AND EXISTS (SELECT 1 FROM public.notifications n
                      WHERE n.organisation_id = o.organisation_id AND n.user_id = o.user_id AND n.visible_at <= now() + interval '1 second')
        UNION ALL
        SELECT DISTINCT o.organisation_id, o.user_id, NULL::uuid, 'cleared'
        FROM removed o
        WHERE o.visible_at <= now() + interval '1 second' AND (o.expires_at IS NULL OR o.expires_at > now())
          AND NOT EXISTS (SELECT 1 FROM public.notifications n
                          WHERE n.organisation_id = o.organisation_id AND n.user_id = o.user_id AND n.visible_at <= now() + interval '1 second')
    ) c;
    RETURN NULL;
END
$$;

CREATE FUNCTION log_feed_watermark() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM log_feed_changes(array_agg(organisation_id ORDER BY organisation_id, user_id),
                             array_agg(user_id ORDER BY organisation_id, user_id),
                             array_agg('read_all'::text ORDER BY organisation_id, user_id),
                             array_agg(NULL::uuid ORDER BY organisation_id, user_id))
    FROM changed_new;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_log_insert AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION log_feed_insert();

CREATE TRIGGER notifications_log_update AFTER UPDATE ON notifications
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION log_feed_update();

CREATE TRIGGER notifications_log_delete AFTER DELETE ON notifications
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION log_feed_delete();

CREATE TRIGGER feed_state_log_insert AFTER INSERT ON feed_state
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION log_feed_watermark();

CREATE TRIGGER feed_state_log_update AFTER UPDATE ON feed_state
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION log_feed_watermark();

-- Streams of a deactivated user, or of a revoked session, end.
CREATE FUNCTION announce_user_deactivated() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM pg_notify('herald_stream', jsonb_build_object('org', n.organisation_id, 'deactivated', n.id)::text)
    FROM changed_new n JOIN changed_old o ON o.organisation_id = n.organisation_id AND o.id = n.id
    WHERE o.active AND NOT n.active;
    RETURN NULL;
END
$$;

CREATE FUNCTION announce_session_revoked() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM pg_notify('herald_stream', jsonb_build_object('org', d.organisation_id, 'session', d.family_id)::text)
    FROM (SELECT DISTINCT n.organisation_id, n.family_id
          FROM changed_new n JOIN changed_old o ON o.organisation_id = n.organisation_id AND o.id = n.id
          WHERE o.revoked_at IS NULL AND n.revoked_at IS NOT NULL) d;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_announce_deactivated AFTER UPDATE ON users
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION announce_user_deactivated();

CREATE TRIGGER refresh_tokens_announce_revoked AFTER UPDATE ON refresh_tokens
    REFERENCING OLD TABLE AS changed_old NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION announce_session_revoked();

-- What time alone changes, across organisations, run by each serving instance about once a second
-- with its clock (p_now; tests pass a controlled one): rows whose deliver_at or expiry has come are logged ('created', 'expired'), up to p_limit of
-- them, claimed with SKIP LOCKED so that instances share the work and none logs a row twice;
-- then up to p_limit changes older than p_retention are removed (feed_streams.purged_through
-- remembers how far), and used or expired tickets. Returns the number of rows logged.
-- p_organisation, when given, confines the sweep to one organisation (tests).
CREATE FUNCTION feed_stream_sweep(p_limit integer, p_retention interval, p_now timestamptz DEFAULT now(), p_organisation uuid DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    logged integer;
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 OR p_retention IS NULL OR p_retention < interval '1 minute' OR p_now IS NULL THEN
        RAISE EXCEPTION 'feed_stream_sweep: limit must be 1 to 100000 and retention at least a minute';
    END IF;
    PERFORM set_config('herald.sweeping', 'on', true);

    WITH due AS (
        SELECT d.organisation_id, d.notification_id, d.kind FROM public.feed_due d
        WHERE d.due_at <= p_now AND (p_organisation IS NULL OR d.organisation_id = p_organisation)
        ORDER BY d.due_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        DELETE FROM public.feed_due d USING due
        WHERE d.organisation_id = due.organisation_id AND d.notification_id = due.notification_id AND d.kind = due.kind
        RETURNING d.organisation_id, d.user_id, d.notification_id, d.kind
    )
    SELECT count(*), log_feed_changes(array_agg(organisation_id ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(user_id ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(kind ORDER BY organisation_id, user_id, notification_id),
                                      array_agg(notification_id ORDER BY organisation_id, user_id, notification_id))
    INTO logged FROM claimed;

    WITH old AS (
        SELECT c.organisation_id, c.user_id, c.seq FROM public.feed_changes c
        WHERE c.created_at < p_now - p_retention AND (p_organisation IS NULL OR c.organisation_id = p_organisation)
        ORDER BY c.created_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ),
    removed AS (
        DELETE FROM public.feed_changes c USING old
        WHERE c.organisation_id = old.organisation_id AND c.user_id = old.user_id AND c.seq = old.seq
        RETURNING c.organisation_id, c.user_id, c.seq
    )
    UPDATE public.feed_streams s SET purged_through = greatest(s.purged_through, r.seq)
    FROM (SELECT organisation_id, user_id, max(seq) AS seq FROM removed GROUP BY organisation_id, user_id) r
    WHERE s.organisation_id = r.organisation_id AND s.user_id = r.user_id;

    DELETE FROM public.stream_tickets t
    WHERE (t.organisation_id, t.id) IN (
        SELECT organisation_id, id FROM public.stream_tickets
        WHERE expires_at < p_now - interval '1 hour' AND (p_organisation IS NULL OR organisation_id = p_organisation) LIMIT p_limit);

    PERFORM set_config('herald.sweeping', '', true);
    RETURN logged;
END
$$;
REVOKE ALL ON FUNCTION feed_stream_sweep(integer, interval, timestamptz, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION feed_stream_sweep(integer, interval, timestamptz, uuid) TO herald_app;
