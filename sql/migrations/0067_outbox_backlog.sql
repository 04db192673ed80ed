-- The outbox's backlog, for the workers' gauges (docs/operations.md, "Metrics"; two trials asked
-- for a queue depth to alert on): per queue and channel, the rows due and not yet taken, the
-- rows waiting for a later time (a retry's backoff, quiet hours, an event's deliver_at), the rows
-- being sent, and how long the oldest due row has waited. Totals across organisations and
-- nothing of any one, read as the owner with herald.claiming on for the statement (the claims'
-- policies, 0003 and 0012), as the claims are; only the worker role may call it.
--
-- Each leg reads one partial index's rows (the due rows of deliveries_due_direct and
-- deliveries_due_endpoint, the leased rows of deliveries_lease_claim, and digest_runs' two), so
-- its cost is the backlog's size, never the table's.
CREATE FUNCTION outbox_backlog()
    RETURNS TABLE (queue text, channel text, due bigint, waiting bigint, sending bigint, oldest_due_seconds double precision)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public
AS $$
DECLARE
    at timestamptz := clock_timestamp();
BEGIN
    PERFORM set_config('herald.claiming', 'on', true);
    RETURN QUERY
    WITH waiting AS (
        SELECT d.channel, d.next_attempt_at FROM public.deliveries d
        WHERE d.status IN ('PENDING', 'FAILED') AND d.endpoint_id IS NULL
        UNION ALL
        SELECT d.channel, d.next_attempt_at FROM public.deliveries d
        WHERE d.status IN ('PENDING', 'FAILED') AND d.endpoint_id IS NOT NULL
    ), leased AS (
        SELECT d.channel, count(*) AS sending FROM public.deliveries d WHERE d.status = 'SENDING' GROUP BY d.channel
    ), pending AS (
        SELECT w.channel, count(*) FILTER (WHERE w.next_attempt_at <= at) AS due, count(*) FILTER (WHERE w.next_attempt_at > at) AS later,
               extract(epoch FROM at - min(w.next_attempt_at) FILTER (WHERE w.next_attempt_at <= at))::double precision AS oldest
        FROM waiting w GROUP BY w.channel
    )
    SELECT 'deliveries'::text, coalesce(p.channel, l.channel)::text, coalesce(p.due, 0), coalesce(p.later, 0), coalesce(l.sending, 0),
           coalesce(p.oldest, 0)
    FROM pending p FULL JOIN leased l ON l.channel = p.channel
    UNION ALL
    SELECT 'digests'::text, 'email'::text,
           (SELECT count(*) FROM public.digest_runs r WHERE r.status IN ('PENDING', 'FAILED') AND r.next_attempt_at <= at),
           (SELECT count(*) FROM public.digest_runs r WHERE r.status IN ('PENDING', 'FAILED') AND r.next_attempt_at > at),
           (SELECT count(*) FROM public.digest_runs r WHERE r.status = 'SENDING'),
           coalesce((SELECT extract(epoch FROM at - min(r.next_attempt_at))::double precision FROM public.digest_runs r
                     WHERE r.status IN ('PENDING', 'FAILED') AND r.next_attempt_at <= at), 0);
    PERFORM set_config('herald.claiming', 'off', true);
END
$$;
REVOKE ALL ON FUNCTION outbox_backlog() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_backlog() TO herald_worker;
