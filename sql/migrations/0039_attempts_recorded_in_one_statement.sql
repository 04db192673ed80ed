-- Issue 12 (delivery's cost per message): the attempts that end together recorded in one round trip.
--
-- Recording a batch of ended attempts was its own tenant transaction of four or five round trips:
-- BEGIN, enter_tenant, complete_deliveries, the answered endpoints' breakers cleared, COMMIT.
-- Sampling pg_stat_activity during the bench's delivery run found the worker's connections mostly
-- "idle in transaction", waiting for the worker's next statement, not working: on two shared
-- cores each round trip waits for the worker to be scheduled. record_delivery_attempts does the
-- same work as one statement, in that statement's own transaction, as the bell's reads do (0031):
--
-- 1. the tenant context (enter_tenant's SET LOCALs end with the statement's transaction);
-- 2. complete_deliveries: each attempt fenced by its lease and logged, unchanged;
-- 3. the breakers of the endpoints that answered a recorded attempt (p_attempts[i].answered) are
--    cleared, as recordEndpointAnswers clears them.
--
-- SECURITY INVOKER: it runs as the worker's role under row-level security, and can touch nothing
-- the transaction it replaces could not. Attempts that disable an endpoint (410 Gone) or count
-- towards opening its breaker keep the transaction, whose order of effects matters.
CREATE FUNCTION record_delivery_attempts(p_organisation uuid, p_worker text, p_attempts jsonb)
    RETURNS SETOF integer
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, public
AS $$
DECLARE
    recorded integer[];
BEGIN
    PERFORM public.enter_tenant(p_organisation, NULL);
    recorded := ARRAY(SELECT public.complete_deliveries(p_worker, p_attempts));
    UPDATE public.endpoints e
    SET circuit_failures = 0, circuit_opened_at = NULL, circuit_retry_at = NULL, circuit_reason = NULL
    WHERE e.organisation_id = p_organisation
      AND e.id IN (SELECT (a ->> 'answered')::uuid FROM jsonb_array_elements(p_attempts) a
                   WHERE a ? 'answered' AND (a ->> 'position')::integer = ANY (recorded))
      AND (e.circuit_failures > 0 OR e.circuit_opened_at IS NOT NULL);
    RETURN QUERY SELECT unnest(recorded);
END
$$;
REVOKE ALL ON FUNCTION record_delivery_attempts(uuid, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION record_delivery_attempts(uuid, text, jsonb) TO herald_worker, herald_app;
