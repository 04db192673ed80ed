-- A fan-out checks that its rows' event exists once per statement, not once per row (issue 12:
-- "six foreign-key checks" per recipient).
--
-- notifications, deliveries, digest_items and event_recipients each had a foreign key to events,
-- and feed_due one to notifications. PostgreSQL checks a foreign key row by row: a query and a
-- row lock per inserted row, although every row of a fan-out's statement names the same event.
-- Measured on a scratch database (PostgreSQL 15, 2 cores, 10 000 recipients of one event, in-app
-- row + email delivery + trace row, median of four): 1 380 ms with the keys, 970 ms without these
-- five (the keys to users, which differ per row, cost about as much again and stay).
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

CREATE FUNCTION check_event_references() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
DECLARE
    missing record;
BEGIN
    FOR missing IN
        SELECT a.organisation_id, a.event_id
        FROM (SELECT DISTINCT organisation_id, event_id FROM added) a
        LEFT JOIN LATERAL (
            SELECT true AS present FROM public.events e
            WHERE e.organisation_id = a.organisation_id AND e.id = a.event_id
            FOR KEY SHARE
        ) e ON true
        WHERE e.present IS NULL
        LIMIT 1
    LOOP
        RAISE EXCEPTION 'insert or update on table "%" violates foreign key constraint "%"', TG_TABLE_NAME, TG_TABLE_NAME || '_event_id_fk'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = TG_TABLE_NAME || '_event_id_fk', TABLE = TG_TABLE_NAME,
                  DETAIL = format('Key (organisation_id, event_id)=(%s, %s) is not present in table "events".', missing.organisation_id, missing.event_id);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION check_event_reference_moved() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, public
AS $$
BEGIN
    PERFORM 1 FROM public.events e WHERE e.organisation_id = NEW.organisation_id AND e.id = NEW.event_id FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'insert or update on table "%" violates foreign key constraint "%"', TG_TABLE_NAME, TG_TABLE_NAME || '_event_id_fk'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = TG_TABLE_NAME || '_event_id_fk', TABLE = TG_TABLE_NAME,
                  DETAIL = format('Key (organisation_id, event_id)=(%s, %s) is not present in table "events".', NEW.organisation_id, NEW.event_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_event_exists AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();
CREATE TRIGGER deliveries_event_exists AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();
CREATE TRIGGER digest_items_event_exists AFTER INSERT ON digest_items
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();
CREATE TRIGGER event_recipients_event_exists AFTER INSERT ON event_recipients
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION check_event_references();

CREATE TRIGGER notifications_event_moved AFTER UPDATE OF organisation_id, event_id ON notifications FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_event_reference_moved();
CREATE TRIGGER deliveries_event_moved AFTER UPDATE OF organisation_id, event_id ON deliveries FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_event_reference_moved();
CREATE TRIGGER digest_items_event_moved AFTER UPDATE OF organisation_id, event_id ON digest_items FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_event_reference_moved();
CREATE TRIGGER event_recipients_event_moved AFTER UPDATE OF organisation_id, event_id ON event_recipients FOR EACH ROW
    WHEN (OLD.organisation_id IS DISTINCT FROM NEW.organisation_id OR OLD.event_id IS DISTINCT FROM NEW.event_id)
    EXECUTE FUNCTION check_event_reference_moved();

-- SECURITY DEFINER, as a key's cascade ran as the tables' owner: whoever may delete an event
-- deletes its rows. The tenant policy still applies (the owner is subject to it).
CREATE FUNCTION delete_event_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    DELETE FROM public.notifications n USING removed r WHERE n.organisation_id = r.organisation_id AND n.event_id = r.id;
    DELETE FROM public.deliveries d USING removed r WHERE d.organisation_id = r.organisation_id AND d.event_id = r.id;
    DELETE FROM public.digest_items i USING removed r WHERE i.organisation_id = r.organisation_id AND i.event_id = r.id;
    DELETE FROM public.event_recipients t USING removed r WHERE t.organisation_id = r.organisation_id AND t.event_id = r.id;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION delete_event_rows() FROM PUBLIC;
CREATE TRIGGER events_delete_rows AFTER DELETE ON events
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION delete_event_rows();

CREATE FUNCTION forget_feed_due() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
BEGIN
    DELETE FROM public.feed_due d USING removed r WHERE d.organisation_id = r.organisation_id AND d.notification_id = r.id;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION forget_feed_due() FROM PUBLIC;
CREATE TRIGGER notifications_forget_due AFTER DELETE ON notifications
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION forget_feed_due();

ALTER FUNCTION log_feed_insert() SECURITY DEFINER;
REVOKE ALL ON FUNCTION log_feed_insert() FROM PUBLIC;
REVOKE INSERT ON feed_due FROM herald_app, herald_worker;
