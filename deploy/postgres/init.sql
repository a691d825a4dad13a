-- One database per service, each owned by a role of its own, so no service can read another's tables
-- (DESIGN.md section 1). Run once by the postgres image on an empty data volume (docker-compose.yml).
-- The passwords are for the local compose suite only; production databases come from their own operator.
-- The gateway keeps nothing and has no database.

CREATE ROLE strata_auth LOGIN PASSWORD 'strata-dev';
CREATE ROLE strata_datasets LOGIN PASSWORD 'strata-dev';
CREATE ROLE strata_execution LOGIN PASSWORD 'strata-dev';
CREATE ROLE strata_schemas LOGIN PASSWORD 'strata-dev';

CREATE DATABASE strata_auth OWNER strata_auth;
CREATE DATABASE strata_datasets OWNER strata_datasets;
CREATE DATABASE strata_execution OWNER strata_execution;
CREATE DATABASE strata_schemas OWNER strata_schemas;

REVOKE ALL ON DATABASE strata_auth FROM PUBLIC;
REVOKE ALL ON DATABASE strata_datasets FROM PUBLIC;
REVOKE ALL ON DATABASE strata_execution FROM PUBLIC;
REVOKE ALL ON DATABASE strata_schemas FROM PUBLIC;
