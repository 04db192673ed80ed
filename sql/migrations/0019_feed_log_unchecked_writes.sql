-- Numbering a fan-out's changes without a foreign-key check per row (issue 10: a 10 000-member
-- fan-out within a second; issue 12: a million).
--
-- feed_streams and feed_changes referenced users, so every row the sweep logged ran a
-- referential check through SPI: two per recipient of a notify. Measured on the bench database
-- (10 000 due rows, one sweep, PostgreSQL 15, 2 cores): 0.67 s with both keys, 0.42 s without
-- feed_changes', 0.24 s without either. The sweep ends before any stream can read, so this time
-- is on every recipient's latency.
--
-- The keys guarded nothing the writers do not already guarantee: only log_feed_changes() writes
-- these tables, and its callers take the users from rows of notifications and feed_state, whose
-- own keys reference users. What the keys did guard was the application role writing the log
-- itself (it held INSERT and UPDATE on both tables, because log_feed_changes() ran as the
-- caller, from triggers). Now the triggers run as the owner (SECURITY DEFINER, fixed
-- search_path), the application and worker roles lose their writes on the two tables, and
-- log_feed_changes() can be called by the owner's functions only. So neither role can write a
-- change, true or false, for any user, of its own organisation or another's.
--
-- Users are never deleted by Herald (they are deactivated). If an operator deletes one in SQL,
-- the user's changes leave with the retention purge (a day by default) and the two-number
-- feed_streams row stays.
ALTER TABLE feed_changes DROP CONSTRAINT feed_changes_user_id_fk;
ALTER TABLE feed_streams DROP CONSTRAINT feed_streams_user_id_fk;

ALTER FUNCTION log_feed_update() SECURITY DEFINER;
ALTER FUNCTION log_feed_delete() SECURITY DEFINER;
ALTER FUNCTION log_feed_watermark() SECURITY DEFINER;

REVOKE INSERT, UPDATE ON feed_streams FROM herald_app, herald_worker;
REVOKE INSERT ON feed_changes FROM herald_app, herald_worker;
REVOKE ALL ON FUNCTION log_feed_changes(uuid[], uuid[], text[], uuid[]) FROM PUBLIC;
