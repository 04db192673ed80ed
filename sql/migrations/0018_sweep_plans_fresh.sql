-- The stream sweep is planned for the rows it has now, on every call.
--
-- PL/pgSQL caches the plans of a function's statements per connection, and after five calls may
-- keep a generic plan. The sweep runs about once a second, so on a fresh installation its plans
-- were made while feed_due and feed_streams were empty: nested loops that are right for no rows.
-- The first large fan-out then met them. Measured on the bench (2 cores, a fresh database): the
-- sweep numbering the 10 000 rows of one notify ran 21.6 s with the cached plan. The same call
-- on a copy of the same data ran for more than 55 minutes before it was cancelled. A planned
-- call took 0.6-0.9 s. Autoanalyze replaces the bad plan eventually; the first fan-out of a new
-- deployment still paid for it.
--
-- Planning each call costs about a millisecond, once a second. log_feed_changes gets the same
-- setting, so its unnest() of the batch is planned knowing how many rows it holds.
ALTER FUNCTION feed_stream_sweep(integer, interval, timestamptz, uuid) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION log_feed_changes(uuid[], uuid[], text[], uuid[]) SET plan_cache_mode = force_custom_plan;
-- (A later CREATE OR REPLACE of either function must repeat the SET clause, or it drops it.)
