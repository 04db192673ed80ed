-- Database roles for Herald. Run once per cluster by an administrator (a superuser, or a role
-- with CREATEROLE), before `herald migrate`. `make db-up` runs it for the private cluster.
--
--   herald_owner   owns the schema; `herald migrate` connects as this role.
--   herald_app     the API server: owns nothing, not superuser, no BYPASSRLS. Every tenant
--                  row it reads or writes passes a row-level security policy.
--   herald_worker  the delivery workers: like herald_app, plus the one function that claims
--                  deliveries across organisations (claim_deliveries); the API server cannot.
--
-- Passwords come from psql variables: psql -v owner_password=... -v app_password=... -v worker_password=...
-- CREATE ROLE defaults to NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE, which is what we want;
-- the owner also gets CREATEDB (the test suite makes scratch databases with it).
SELECT format('CREATE ROLE herald_owner LOGIN CREATEDB PASSWORD %L', :'owner_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'herald_owner') \gexec
SELECT format('CREATE ROLE herald_app LOGIN PASSWORD %L', :'app_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'herald_app') \gexec
SELECT format('CREATE ROLE herald_worker LOGIN PASSWORD %L', :'worker_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'herald_worker') \gexec
-- Nothing here grants SUPERUSER or BYPASSRLS; the test suite checks the application role has
-- neither. Existing roles are left as they are (passwords included).
