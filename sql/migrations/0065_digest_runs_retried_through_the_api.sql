-- POST /v1/digest-runs/{runId}/retry puts a DEAD or FAILED digest run back in the queue (a
-- product trial: a digest that went DEAD, after its address was fixed, could not be sent again).
-- Until now only the workers changed a run; the API read them. The application role may change
-- the columns a retry sets, and no others: the run's lease, its frozen items and its sent time
-- stay the workers' (the retry is `TenantTransaction.retryDigestRun`, fenced on the status).
GRANT UPDATE (status, max_attempts, next_attempt_at, last_error, last_response, updated_at) ON digest_runs TO herald_app;
