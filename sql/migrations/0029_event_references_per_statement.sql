-- A fan-out checks that its rows' event exists once per statement, not once per row (issue 12:
-- "six foreign-key checks" per recipient).
--
-- notifications, deliveries, digest_items and event_recipients each had a foreign key to events,
-- and feed_due one to notifications. PostgreSQL checks a foreign key row by row: a query and a
-- row lock per inserted row, although every row of a fan-out's statement names the same event.
-- Measured on a scratch database (PostgreSQL 15, 2 cores, 10 000 recipients of one event, in-app
-- row + email delivery + trace row, median of four): 1 380 ms with the keys, 970 ms without these
-- five (the keys to users, which differ per row, cost about as much again: 0030).
--
-- Each key is replaced by what it did, per statement:
-- - an insert checks the distinct events its rows name (usually one) and locks them FOR KEY
--   SHARE, as the key did, so a concurrent delete of the event waits for the insert's
--   transaction; a missing event is the same error as before (SQLSTATE 23503, the old
--   constraint's name), so the API's mapping of it is unchanged;
-- - an update that moves a row to another event (nothing in Herald does) is checked row by row;
-- - deleting events deletes their rows, as ON DELETE CASCADE did (Herald's retention deletes the
--   rows first; an organisation's deletion reaches them through its users as well);
-- - feed_due is written only by the notifications trigger, from the rows just inserted, so its
--   key checked what cannot fail: the roles lose INSERT on it (the trigger runs as the owner),
--   and deleting notifications deletes their due rows, as the key's cascade did.
ALTER TABLE notifications DROP CONSTRAINT notifications_event_id_fk;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_event_id_fk;
ALTER TABLE digest_items DROP CONSTRAINT digest_items_event_id_fk;
ALTER TABLE event_recipients DROP CONSTRAINT event_recipients_event_id_fk;
ALTER TABLE feed_due DROP CONSTRAINT feed_due_notification_id_fk;

-- One pair of functions for every such reference (0030 uses them for users): TG_ARGV[0] is the
-- referenced table, TG_ARGV[1] the referencing column (the key is (organisation_id, column)).
CREATE FUNCTION check_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    missing uuid[];
BEGIN
    EXECUTE format(
        'SELECT ARRAY[a.organisation_id, a.ref] FROM (SELECT DISTINCT organisation_id, %1$I AS ref FROM added) a
         LEFT JOIN LATERAL (SELECT true AS present FROM public.%2$I r WHERE r.organisation_id = a.organisation_id AND r.id = a.ref
                            FOR KEY SHARE) r ON true
         WHERE r.present IS NULL LIMIT 1', TG_ARGV[1], TG_ARGV[0])
    INTO missing;
    IF missing IS NOT NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1], missing[1], missing[2]);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION check_reference_moved() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    ref uuid := (to_jsonb(NEW) ->> TG_ARGV[1])::uuid;
    present boolean;
BEGIN
    EXECUTE format('SELECT true FROM public.%I r WHERE r.organisation_id = $1 AND r.id = $2 FOR KEY SHARE', TG_ARGV[0])
        INTO present USING NEW.organisation_id, ref;
    IF present IS NULL THEN
        PERFORM raise_reference_missing(TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1], NEW.organisation_id, ref);
    END IF;
    RETURN NULL;
END
$$;

-- The error a foreign key gives, under the name the key had (<table>_<column>_fk).
CREATE FUNCTION raise_reference_missing(p_table text, p_referenced text, p_column text, p_organisation uuid, p_ref uuid)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    RAISE EXCEPTION 'insert or update on table "%" violates foreign key constraint "%"', p_table, p_table || '_' || p_column || '_fk'
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = p_table || '_' || p_column || '_fk', TABLE = p_table,
              DETAIL = format('Key (organisation_id, %s)=(%s, %s) is not present in table "%s".', p_column, p_organisation, p_ref, p_referenced);
END
$$;

CREATE TRIGGER notifications_event_exists AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('events', 'event_id');
CREATE TRIGGER deliveries_event_exists AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('events', 'event_id');
CREATE TRIGGER digest_items_event_exists AFTER INSERT ON digest_items
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('events', 'event_id');
CREATE TRIGGER event_recipients_event_exists AFTER INSERT ON event_recipients
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_references('events', 'event_id');

CREATE TRIGGER notifications_event_moved AFTER UPDATE OF organisation_id, event_id ON notifications FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_reference_moved('events', 'event_id');
CREATE TRIGGER deliveries_event_moved AFTER UPDATE OF organisation_id, event_id ON deliveries FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_reference_moved('events', 'event_id');
CREATE TRIGGER digest_items_event_moved AFTER UPDATE OF organisation_id, event_id ON digest_items FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_reference_moved('events', 'event_id');
CREATE TRIGGER event_recipients_event_moved AFTER UPDATE OF organisation_id, event_id ON event_recipients FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_reference_moved('events', 'event_id');

-- Deletes the rows that name the deleted ones, as ON DELETE CASCADE did: TG_ARGV[0] is the
-- referencing column, the rest are the referencing tables (0030 uses it for users).
-- SECURITY DEFINER, as a key's cascade ran as the tables' owner: whoever may delete the row
-- deletes what names it. The tenant policy still applies (the owner is subject to it).
CREATE FUNCTION delete_referencing_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    FOR i IN 1 .. TG_NARGS - 1 LOOP
        EXECUTE format('DELETE FROM public.%I t USING removed r WHERE t.organisation_id = r.organisation_id AND t.%I = r.id',
                       TG_ARGV[i], TG_ARGV[0]);
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION delete_referencing_rows() FROM PUBLIC;
CREATE TRIGGER events_delete_rows AFTER DELETE ON events
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION delete_referencing_rows('event_id', 'notifications', 'deliveries', 'digest_items', 'event_recipients');
CREATE TRIGGER notifications_forget_due AFTER DELETE ON notifications
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION delete_referencing_rows('notification_id', 'feed_due');

ALTER FUNCTION log_feed_insert() SECURITY DEFINER;
REVOKE ALL ON FUNCTION log_feed_insert() FROM PUBLIC;
REVOKE INSERT ON feed_due FROM herald_app, herald_worker;
