-- The statement-level reference checks keep their plans (issue 12: every small notify).
--
-- check_references (0029, 0030) checks the events or users a statement's new rows name, once per
-- statement, with a query built by format() and run by EXECUTE, which PostgreSQL plans on every
-- call: about 0.1 ms a check on a scratch database (EXPLAIN ANALYZE of a one-row INSERT into
-- notifications: notifications_event_exists 0.12-0.16 ms, notifications_user_exists 0.11 ms, of
-- 0.31 ms for the whole statement). A notify to one user runs six of them (an event and a user
-- for each of its in-app row, delivery and trace row), which made its three one-row INSERTs the
-- next largest statements of a small notify after the audience's (0036).
--
-- One function per referenced table, with its query written out, which PL/pgSQL plans once per
-- session and table: 0.03 ms a check measured the same way. The query is the same as before (a
-- probe per distinct reference, FOR KEY SHARE), and so is its plan whatever the statement's size:
-- a 10 000-row INSERT's user check took 23-29 ms with the plan kept from one-row statements,
-- against 28 ms planned for it. The triggers keep their names; the errors are the same
-- (raise_reference_missing, SQLSTATE 23503, the constraint's old name).
CREATE FUNCTION check_event_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    missing uuid[];
BEGIN
    SELECT ARRAY[a.organisation_id, a.ref] INTO missing
    FROM (SELECT DISTINCT organisation_id, event_id AS ref FROM added) a
    LEFT JOIN LATERAL (SELECT true AS present FROM public.events r WHERE r.organisation_id = a.organisation_id AND r.id = a.ref
                       FOR KEY SHARE) r ON true
    WHERE r.present IS NULL LIMIT 1;
    IF missing IS NOT NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, 'events', 'event_id', missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION check_user_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    missing uuid[];
BEGIN
    SELECT ARRAY[a.organisation_id, a.ref] INTO missing
    FROM (SELECT DISTINCT organisation_id, user_id AS ref FROM added) a
    LEFT JOIN LATERAL (SELECT true AS present FROM public.users r WHERE r.organisation_id = a.organisation_id AND r.id = a.ref
                       FOR KEY SHARE) r ON true
    WHERE r.present IS NULL LIMIT 1;
    IF missing IS NOT NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, 'users', 'user_id', missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER notifications_event_exists ON notifications;
CREATE TRIGGER notifications_event_exists AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();
DROP TRIGGER deliveries_event_exists ON deliveries;
CREATE TRIGGER deliveries_event_exists AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();
DROP TRIGGER digest_items_event_exists ON digest_items;
CREATE TRIGGER digest_items_event_exists AFTER INSERT ON digest_items
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();
DROP TRIGGER event_recipients_event_exists ON event_recipients;
CREATE TRIGGER event_recipients_event_exists AFTER INSERT ON event_recipients
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();

DROP TRIGGER notifications_user_exists ON notifications;
CREATE TRIGGER notifications_user_exists AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_user_references();
DROP TRIGGER deliveries_user_exists ON deliveries;
CREATE TRIGGER deliveries_user_exists AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_user_references();
DROP TRIGGER event_recipients_user_exists ON event_recipients;
CREATE TRIGGER event_recipients_user_exists AFTER INSERT ON event_recipients
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_user_references();

DROP FUNCTION check_references();
