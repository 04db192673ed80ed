-- Heartbeats never wait for a row lock (issue 12).
--
-- A heartbeat extends the leases of every item a worker holds, one row at a time (0032), while
-- the same worker's completions record the items that just finished, also one row at a time and
-- in another order. When a heartbeat and a completion batch both reached rows the other had
-- already updated, each waited for the other: PostgreSQL broke the deadlock by failing one of
-- them, and when that was the completion, the attempts it recorded were lost with it. Their
-- leases expired a minute later and the messages were sent a second time (`make bench`, 10 of
-- 10 000 emails, 2026-12-05).
--
-- A row another transaction holds is one that is being completed, given back or rescued: its
-- lease is that transaction's to settle, so the heartbeat skips it (FOR UPDATE SKIP LOCKED).
-- It never waits, so it can be in no cycle of waits. The outer statement names the row's key as
-- well as its ctid: every statement names its organisation (on a distributed PostgreSQL a ctid
-- means nothing outside its shard).
CREATE OR REPLACE FUNCTION extend_leases(p_table text, p_worker text, p_ids uuid[], p_attempts integer[], p_lease_seconds integer)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, public
AS $$
DECLARE
    org uuid := nullif(current_setting('app.org_id', true), '')::uuid;
    held text := CASE p_table
        WHEN 'deliveries' THEN '(status = ''SENDING'') IS TRUE'
        WHEN 'digest_runs' THEN '(status = ''SENDING'') IS TRUE'
        WHEN 'jobs' THEN '(status = ''RUNNING'') IS TRUE'
        WHEN 'schedules' THEN 'true' END;
    extended integer := 0;
    touched integer;
BEGIN
    IF org IS NULL THEN
        RAISE EXCEPTION 'extend_leases: runs in a tenant transaction';
    END IF;
    IF held IS NULL THEN
        RAISE EXCEPTION 'extend_leases: % is not a leased table', p_table;
    END IF;
    IF cardinality(p_attempts) <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'extend_leases: one attempt per id';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        EXECUTE format(
            'UPDATE public.%1$I SET lease_expires_at = now() + make_interval(secs => $1) '
            'WHERE organisation_id = $2 AND id = $3 AND ctid = (SELECT ctid FROM public.%1$I '
            'WHERE organisation_id = $2 AND id = $3 AND attempts = $4 AND (lease_owner = $5) IS TRUE AND %2$s '
            'FOR UPDATE SKIP LOCKED)',
            p_table, held)
        USING p_lease_seconds, org, p_ids[i], p_attempts[i], p_worker;
        GET DIAGNOSTICS touched = ROW_COUNT;
        extended := extended + touched;
    END LOOP;
    RETURN extended;
END
$$;
