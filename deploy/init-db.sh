#!/bin/sh
# First start of the compose PostgreSQL: Herald's roles and database.
set -e
psql -v ON_ERROR_STOP=1 -U postgres -v owner_password=herald_owner -v app_password=herald_app -v worker_password=herald_worker -f /srv/roles.sql
psql -v ON_ERROR_STOP=1 -U postgres -c "CREATE DATABASE herald OWNER herald_owner"
psql -v ON_ERROR_STOP=1 -U postgres -d herald -c "REVOKE CREATE ON SCHEMA public FROM PUBLIC; ALTER SCHEMA public OWNER TO herald_owner"
