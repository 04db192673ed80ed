-- The stream sweep never joins its batch by nested loops (found measuring issue 12's chunked
-- fan-out).
--
-- feed_stream_sweep() joins its batch (CTEs of up to 10 000 rows: the due rows, the users it
-- holds, the users ready) with each other and with feed_due, and log_feed_changes() joins the
-- changes with the bumped stream rows. Each call is planned afresh (0018), but from statistics
-- that lag a burst: right after a fan-out, feed_due is believed almost empty. The planner then
-- joins CTE scans by nested loops, which read one tuplestore once per row of the other: on the
-- bench, two sweeps of 5 000 rows each ran for more than four minutes of CPU (perf: whole-row
-- evaluation, tuplestore reads and uuid_eq), while feed_due grew to 700 000 rows behind a
-- million-member fan-out and no stream heard of it. The same statement planned with fresh
-- statistics took 107 ms for 500 rows.
--
-- Hash joins are right at every size these functions see, so both forbid nested loops for their
-- statements (the planner still uses one where nothing else can do the join). The cost at the
-- small end is a hash table of a few rows.
ALTER FUNCTION feed_stream_sweep(integer, interval, timestamptz, uuid) SET enable_nestloop = off;
ALTER FUNCTION log_feed_changes(uuid[], uuid[], text[], uuid[]) SET enable_nestloop = off;
