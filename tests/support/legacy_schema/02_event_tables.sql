-- The collected events, one row per (host_identifier, source_id): source_id is the row's id in
-- the host's local SQLite file, so re-sending a row can never create a second copy.
-- row_version grows every time the local row changes; the sync engine's upsert only overwrites
-- a stored row with a strictly newer version (newest wins, stale copies never overwrite).
-- synced_at is when PostgreSQL received the current version.
-- The sync engine derives its column lists from this schema: a column added here with a
-- matching local column is shipped without code changes.

CREATE TABLE IF NOT EXISTS desktop_activity_sessions (
    host_identifier  TEXT        NOT NULL,
    source_id        BIGINT      NOT NULL,
    row_version      BIGINT      NOT NULL DEFAULT 0,
    start_time       TIMESTAMP WITH TIME ZONE NOT NULL,
    end_time         TIMESTAMP WITH TIME ZONE,
    duration_seconds BIGINT CHECK (duration_seconds >= 0),
    application_name TEXT        NOT NULL,
    window_title     TEXT,
    process_name     TEXT,
    pid              INTEGER,
    is_idle          BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at       TIMESTAMP WITH TIME ZONE NOT NULL,
    synced_at        TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT desktop_activity_sessions_host_source UNIQUE (host_identifier, source_id)
);
CREATE INDEX IF NOT EXISTS idx_desktop_activity_start_time
    ON desktop_activity_sessions (start_time);

CREATE TABLE IF NOT EXISTS file_change_events (
    host_identifier    TEXT    NOT NULL,
    source_id          BIGINT  NOT NULL,
    row_version        BIGINT  NOT NULL DEFAULT 0,
    event_time         TIMESTAMP WITH TIME ZONE NOT NULL,
    event_type         TEXT    NOT NULL
        CHECK (event_type IN ('created', 'modified', 'deleted', 'moved')),
    file_path          TEXT    NOT NULL,
    file_path_relative TEXT,
    file_name          TEXT    NOT NULL,
    file_extension     TEXT,
    file_size          BIGINT CHECK (file_size >= 0),
    is_symlink         BOOLEAN NOT NULL DEFAULT FALSE,
    monitored_root     TEXT    NOT NULL,
    project_name       TEXT,
    file_path_raw      BYTEA,
    created_at         TIMESTAMP WITH TIME ZONE NOT NULL,
    synced_at          TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT file_change_events_host_source UNIQUE (host_identifier, source_id)
);
CREATE INDEX IF NOT EXISTS idx_file_change_events_event_time
    ON file_change_events (event_time);

INSERT INTO schema_version (version, description)
VALUES (1, 'event tables keyed by (host_identifier, source_id)')
ON CONFLICT (version) DO NOTHING;
