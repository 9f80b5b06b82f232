-- Version 8: the audit of columns agents added themselves (data_sync.allow_schema_alter).
--
-- Off by default, an agent whose local table has a column the server lacks refuses to ship
-- that table (exit 5, naming the columns). With the option on, it adds each such column as a
-- NULLable column (ALTER TABLE .. ADD COLUMN IF NOT EXISTS), records it here, and records a
-- schema_version above 1000 (1000 + this table's id), kept apart from the versions of these
-- files. It never drops, renames or retypes a column. Upgrading the server's schema files
-- before the agents makes this unnecessary.

CREATE TABLE IF NOT EXISTS schema_changes (
    id              BIGSERIAL,
    host_identifier TEXT NOT NULL,            -- the host whose agent made the change
    table_name      TEXT NOT NULL,
    column_name     TEXT NOT NULL,
    column_type     TEXT NOT NULL,
    statement       TEXT NOT NULL,
    changed_at      TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (host_identifier, id)
);

INSERT INTO schema_version (version, description)
VALUES (8, 'schema_changes: columns agents added (allow_schema_alter), audited')
ON CONFLICT (version) DO NOTHING;
