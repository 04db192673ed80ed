-- A chunk's deliveries and in-app rows find their own trace rows with one range read, not a probe
-- each (issue 12: the fan-out's cost per recipient).
--
-- check_traced_user_references (0054) looked up, for every (event, user) a statement added, the
-- trace row written by the same transaction: one descent of event_recipients' primary key per
-- row, twice per recipient of a fan-out (its delivery, its in-app row). The rows a statement adds
-- for one event are a chunk of its audience, whose trace rows are the event's rows between the
-- chunk's first and last user: one read of that range of the same index finds them all. The
-- added (event, user) pairs without such a trace row are what EXCEPT leaves (a hashed or sorted
-- set operation, never a join the planner could turn into a scan of every trace row, as the
-- first version of 0054 did); only those are probed in users and locked, 23503 when missing, as
-- before. The range read is kept a lookup per event (OFFSET 0: left to itself, the planner
-- joined the events to a scan of every trace row, 150 ms for 10 000 rows on the bench database),
-- and the function is planned without JIT, which the planner's guess for the range (it cannot
-- know a chunk's size) would otherwise pay for on every call (about 9 ms). PostgreSQL 15 has no
-- min(uuid): the bounds are taken over the ids' text, in byte order ("C"), which is uuid's order.
-- Measured there (EXPLAIN ANALYZE of the check over 10 000 added rows): 11 ms against 19 ms.
CREATE OR REPLACE FUNCTION check_traced_user_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
    SET jit = off
AS $$
DECLARE
    missing uuid[];
    this_xact xid := pg_current_xact_id()::xid;
BEGIN
    SELECT ARRAY[s.organisation_id, s.user_id] INTO missing
    FROM (SELECT a.organisation_id, a.event_id, a.user_id FROM added a
          EXCEPT
          SELECT t.organisation_id, t.event_id, t.user_id
          FROM (SELECT a.organisation_id, a.event_id, min(a.user_id::text COLLATE "C")::uuid AS first_user,
                       max(a.user_id::text COLLATE "C")::uuid AS last_user
                FROM added a GROUP BY a.organisation_id, a.event_id) k
          CROSS JOIN LATERAL (SELECT t.organisation_id, t.event_id, t.user_id FROM public.event_recipients t
                              WHERE t.organisation_id = k.organisation_id AND t.event_id = k.event_id
                                AND t.user_id BETWEEN k.first_user AND k.last_user AND t.xmin = this_xact
                              OFFSET 0) t) s
    LEFT JOIN LATERAL (SELECT true AS present FROM public.users r
                       WHERE r.organisation_id = s.organisation_id AND r.id = s.user_id
                       FOR KEY SHARE) r ON true
    WHERE r.present IS NULL LIMIT 1;
    IF missing IS NOT NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, 'users', 'user_id', missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;
