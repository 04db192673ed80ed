-- A feed's statements walk the user's index ranges in order; they never build bitmaps (issue 12:
-- "cost independent of feed size"; the query-plan guards).
--
-- The bell's first page takes the newest unread rows, then the newest read ones, each leg
-- "ORDER BY id DESC LIMIT page" over an index of (organisation, user, id). PostgreSQL estimates a
-- user's rows from the table's statistics: a user whose feed grew since the last ANALYZE (3 000
-- new rows are below autovacuum's threshold on a table of 100 000) is taken to have the average
-- user's few rows, below the page's size, and the plan becomes a bitmap scan of all the user's
-- rows and a sort, not a walk that stops after a page. The guard saw 3 007 rows read for a page
-- of 21 in full test runs after migration 0025 made the rows narrower (bitmap scans cheaper);
-- before, the same statement sat just on the other side of the same cost boundary.
--
-- A transaction with a recipient (the feed endpoints, one user's rows) therefore runs with
-- bitmap scans off: each leg is then an index walk in order, which reads a page whatever the
-- estimate. Nothing such a transaction runs needs a bitmap: its statements read one user's index
-- ranges or rows by primary key, and search walks the user's rows (0025).
CREATE OR REPLACE FUNCTION enter_tenant(p_organisation uuid, p_recipient uuid)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    EXECUTE format('SET LOCAL app.org_id = %L', p_organisation);
    IF p_recipient IS NOT NULL THEN
        EXECUTE format('SET LOCAL app.recipient_id = %L', p_recipient);
        SET LOCAL enable_bitmapscan = off;
    END IF;
END
$$;
