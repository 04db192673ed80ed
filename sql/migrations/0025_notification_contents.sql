-- What an in-app notification says is stored once per event, not once per recipient (issue 12:
-- notify to 100 000 members; "store what an event says once; keep per-recipient rows lean ...
-- and search over the event's content").
--
-- Each in-app row carried its rendered title and body, a tsvector generated from them and that
-- tsvector's entry in a GIN index. Most events render the same text for every recipient, so a
-- fan-out wrote the same words, and indexed them, once per member. Measured on a scratch
-- database (PostgreSQL 15, 2 cores, 10 000 rows of one event, as the superuser): 613 ms per
-- INSERT with the tsvector and its GIN entry, 384 ms without them.
--
-- Now what an event says lives in notification_contents: the in-app template rendered with the
-- recipient's name, email and attributes left empty, once per event and locale. In-app rows point
-- at theirs with content_id, and keep a title and body of their own only when their template made
-- them personal (it names the recipient); feed reads take the row's own text, else the content's,
-- joined by primary key. Search runs over the contents' tsvector: over what the event says, not
-- over a recipient's own name.
--
-- content_id has no foreign key: a content row is written in the same transaction as the rows
-- that point at it, by the same statement sequence (EventWriter), and leaves only with its event
-- (ON DELETE CASCADE below), which takes its in-app rows with it. A key would cost a referential
-- check per recipient (about 60 ms per 10 000 rows above) to guard what no statement does. Reads
-- join on (organisation_id, content_id), so a row can only ever show its own organisation's text.
CREATE TABLE notification_contents (
    organisation_id uuid NOT NULL,
    id              uuid NOT NULL,
    event_id        uuid NOT NULL,
    title           text NOT NULL,
    body            text NOT NULL,
    search          tsvector GENERATED ALWAYS AS (to_tsvector('simple', title || ' ' || body)) STORED,
    PRIMARY KEY (organisation_id, id),
    FOREIGN KEY (organisation_id, event_id) REFERENCES events (organisation_id, id) ON DELETE CASCADE
);
CREATE INDEX notification_contents_event ON notification_contents (organisation_id, event_id);
CREATE INDEX notification_contents_search ON notification_contents USING gin (organisation_id, search);

-- Existing rows keep their text: each becomes its own content row (same id as the in-app row),
-- searchable as before. The owner runs migrations without BYPASSRLS, so row-level security is
-- lifted for the move and forced again below; the feed triggers are off for it (the rows do not
-- change for readers).
DROP INDEX notifications_search;
ALTER TABLE notifications DROP COLUMN search;
ALTER TABLE notifications NO FORCE ROW LEVEL SECURITY;
INSERT INTO notification_contents (organisation_id, id, event_id, title, body)
SELECT organisation_id, id, event_id, title, body FROM notifications;
ALTER TABLE notifications ADD COLUMN content_id uuid,
    ALTER COLUMN title DROP NOT NULL, ALTER COLUMN body DROP NOT NULL;
ALTER TABLE notifications DISABLE TRIGGER USER;
UPDATE notifications SET content_id = id, title = NULL, body = NULL;
ALTER TABLE notifications ENABLE TRIGGER USER;
ALTER TABLE notifications FORCE ROW LEVEL SECURITY;
ALTER TABLE notifications ALTER COLUMN content_id SET NOT NULL;

ALTER TABLE notification_contents ENABLE ROW LEVEL SECURITY;
ALTER TABLE notification_contents FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notification_contents
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT ON notification_contents TO herald_app;
GRANT SELECT ON notification_contents TO herald_worker;

-- Delivery claims are per organisation since 0023 (deliveries_due); the global claim index is
-- one more btree entry per delivery that no claim reads.
DROP INDEX deliveries_claim;
