-- Chunked fan-out for large audiences (issue 12: notify to 100 000 members held one transaction
-- and all of them in memory for 15-30 s; a million was not possible).
--
-- Notify to an audience larger than the synchronous limit (HERALD_FANOUT_SYNC_LIMIT, 10 000 by
-- default) writes only the event, with fanout_state EXPANDING, and answers 202 at once. `herald
-- serve` leases the event (claim_fanouts, across organisations, like the other claims) and
-- writes its recipients in chunks of HERALD_FANOUT_CHUNK users (10 000 by default), in user id
-- order, one transaction per chunk. Each chunk locks the event row, checks the lease (owner and
-- attempt, the fence) and that the event is not cancelled, writes the chunk's in-app rows,
-- deliveries, digest items and decision trace, and moves fanout_cursor (the last user id
-- written), fanout_done and the event's counts, all in the same commit: a crash between chunks
-- loses nothing and repeats nothing, the next lease goes on from the cursor. Deliveries of early
-- chunks are sent while later chunks are written. Cancelling waits for the chunk in progress
-- (the row lock), cancels what it wrote, and the next chunk sees CANCELLED and stops.
--
-- fanout_state NULL: the event was written whole by notify's own transaction (the audience was
-- within the synchronous limit), as every event before this migration.
ALTER TABLE events
    ADD COLUMN fanout_state            text,
    ADD COLUMN fanout_cursor           uuid,
    ADD COLUMN fanout_done             integer NOT NULL DEFAULT 0,
    ADD COLUMN fanout_expected         integer,
    ADD COLUMN fanout_attempts         integer NOT NULL DEFAULT 0,
    ADD COLUMN fanout_lease_owner      text,
    ADD COLUMN fanout_lease_expires_at timestamptz,
    ADD COLUMN fanout_finished_at      timestamptz,
    ADD CONSTRAINT events_fanout_state_valid CHECK (fanout_state IN ('EXPANDING', 'DONE', 'CANCELLED'));
-- Global claim index, as the outbox's: fan-outs to do are found across organisations.
CREATE INDEX events_fanout_claim ON events (created_at) WHERE fanout_state = 'EXPANDING';

CREATE POLICY owner_claims ON events TO CURRENT_USER
    USING (current_setting('herald.claiming', true) = 'on') WITH CHECK (current_setting('herald.claiming', true) = 'on');

-- Leases up to p_limit events still expanding whose lease is free or expired, oldest first.
CREATE FUNCTION claim_fanouts(p_worker text, p_limit integer, p_lease_seconds integer, p_organisation uuid DEFAULT NULL)
    RETURNS TABLE (organisation_id uuid, event_id uuid, attempt integer)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    IF p_worker IS NULL OR length(p_worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'claim_fanouts: a worker name of 1 to 200 characters is required';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'claim_fanouts: limit must be 1 to 1000 and lease 1 to 3600 seconds';
    END IF;
    PERFORM set_config('herald.claiming', 'on', true);
    RETURN QUERY
    WITH due AS (
        SELECT e.organisation_id, e.id FROM public.events e
        WHERE e.fanout_state = 'EXPANDING' AND (e.fanout_lease_owner IS NULL OR e.fanout_lease_expires_at < now())
          AND (p_organisation IS NULL OR e.organisation_id = p_organisation)
        ORDER BY e.created_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE public.events e
    SET fanout_attempts = e.fanout_attempts + 1, fanout_lease_owner = p_worker,
        fanout_lease_expires_at = now() + make_interval(secs => p_lease_seconds)
    FROM due WHERE e.organisation_id = due.organisation_id AND e.id = due.id
    RETURNING e.organisation_id, e.id, e.fanout_attempts;
    PERFORM set_config('herald.claiming', '', true);
END
$$;
REVOKE ALL ON FUNCTION claim_fanouts(text, integer, integer, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION claim_fanouts(text, integer, integer, uuid) TO herald_app;

-- The users an audience names, in id order, after p_after (NULL: from the start), at most
-- p_limit (NULL: all). Each source is read in user order from its own index and cut at p_limit,
-- so a chunk costs its size, not the audience's: the first p_limit users of the union are among
-- the first p_limit of each source. Explicit user ids are not checked here (notify checks them
-- first; the caller joins users). Runs as the caller: the tenant policy applies.
CREATE FUNCTION audience_candidates(p_organisation uuid, p_everyone boolean, p_users uuid[], p_roles text[], p_groups text[],
                                    p_after uuid, p_limit integer)
    RETURNS TABLE (user_id uuid)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, public
AS $$
    SELECT c.user_id FROM (
        (SELECT u.id AS user_id FROM users u
         WHERE p_everyone AND u.organisation_id = p_organisation AND (p_after IS NULL OR u.id > p_after)
         ORDER BY u.id LIMIT p_limit)
        UNION
        SELECT x FROM unnest(p_users) x WHERE p_after IS NULL OR x > p_after
        UNION
        SELECT m.user_id FROM groups g
        CROSS JOIN LATERAL (
            SELECT gm.user_id FROM group_members gm
            WHERE gm.organisation_id = p_organisation AND gm.group_id = g.id AND (p_after IS NULL OR gm.user_id > p_after)
            ORDER BY gm.user_id LIMIT p_limit) m
        WHERE g.organisation_id = p_organisation AND g.key = ANY(p_groups)
        UNION
        SELECT h.user_id FROM roles r
        CROSS JOIN LATERAL (
            SELECT ur.user_id FROM user_roles ur
            WHERE ur.organisation_id = p_organisation AND ur.role_id = r.id AND (p_after IS NULL OR ur.user_id > p_after)
            ORDER BY ur.user_id LIMIT p_limit) h
        WHERE r.organisation_id = p_organisation AND r.key = ANY(p_roles)
    ) c
    ORDER BY c.user_id
    LIMIT p_limit
$$;
GRANT EXECUTE ON FUNCTION audience_candidates(uuid, boolean, uuid[], text[], text[], uuid, integer) TO herald_app;

-- A role's members in user order, for the chunks above (the old index had no user column).
CREATE INDEX user_roles_role_user ON user_roles (organisation_id, role_id, user_id);
DROP INDEX user_roles_role;
