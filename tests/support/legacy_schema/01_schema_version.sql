-- Schema versions applied to this database. Every file below records its version here.
-- Idempotent: safe to run any number of times (docker's initdb runs it once; `host-agent init-db`
-- runs it on every call).
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP
);
