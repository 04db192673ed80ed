-- One index entry less per delivery and per trace row (issue 12: the fan-out's cost per recipient).
--
-- deliveries_created (organisation_id, created_at DESC, id DESC) served only the deliveries list,
-- newest first. Delivery ids are UUID v7 (time-ordered, made when the delivery is planned), so the
-- list now reads the primary key (organisation_id, id) backwards, and its cursor compares ids.
--
-- event_recipients_recent (organisation_id, created_at) INCLUDE (user_id) WHERE notified served
-- only the per-user limit across categories (user_throttle_per_minute). That count now reads
-- event_recipients_throttle (organisation_id, category_id, created_at) INCLUDE (user_id) WHERE
-- notified, one minute of each category the trace names, stepping from one category to the next
-- in that index (a loose index scan: a lookup per category).
--
-- Measured with the notify section of make bench (100 000 members, in-app + email, release build
-- of fd36f33, the two DROP INDEX statements as a migration of their own, alternated five times):
-- 2.19, 2.07, 2.11, 2.17, 2.12 s without the two indexes; 2.47, 2.10, 2.26, 2.31, 2.36 s with them.
DROP INDEX deliveries_created;
DROP INDEX event_recipients_recent;
