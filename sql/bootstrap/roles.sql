-- Database roles for Herald. Run once per cluster by an administrator (a superuser, or a role
-- with CREATEROLE), before `herald migrate`. `make db-up` runs it for the private cluster.
--
--   herald_owner   owns the schema; `herald migrate` connects as this role.
--   herald_app     the API server: owns nothing, not superuser, no BYPASSRLS. Every tenant
--                  row it reads or writes passes a row-level security policy.
--   herald_worker  reserved for the delivery worker pool (a narrow, explicit claim path).
--
-- Passwords come from psql variables: psql -v owner_password=... -v app_password=...
SELECT format('CREATE ROLE herald_owner LOGIN PASSWORD %L', :'owner_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'herald_owner') \gexec
SELECT format('CREATE ROLE herald_app LOGIN PASSWORD %L', :'app_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'herald_app') \gexec
SELECT 'CREATE ROLE herald_worker NOLOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'herald_worker') \gexec

ALTER ROLE herald_app NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
ALTER ROLE herald_worker NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
-- The owner creates scratch databases in the test suite (migration tests); it is not a superuser
-- and does not bypass row-level security either: FORCE applies to it too.
ALTER ROLE herald_owner NOSUPERUSER NOBYPASSRLS CREATEDB NOCREATEROLE;
