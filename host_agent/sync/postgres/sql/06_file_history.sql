-- Version 5: file history. A `moved` row carries its source path (previous_path; its raw
-- bytes in previous_path_raw when the name is not valid UTF-8, as for file_path), and rows the
-- watcher's start scan found (changes made while the agent was not running, or lost with it)
-- are flagged found_at_start. Replaying a root's rows in source_id order gives the paths that
-- exist: created/modified add the path, deleted removes exactly it, moved removes
-- previous_path and everything below it and adds file_path with everything that was below the
-- source (see host_agent/collectors/filesystem/replay.py).
--
-- ADD COLUMN on the partitioned table reaches every partition (the default one included);
-- nullable columns and a constant default rewrite nothing. Idempotent.

ALTER TABLE file_change_events ADD COLUMN IF NOT EXISTS previous_path TEXT;
ALTER TABLE file_change_events ADD COLUMN IF NOT EXISTS previous_path_raw BYTEA;
ALTER TABLE file_change_events
    ADD COLUMN IF NOT EXISTS found_at_start BOOLEAN NOT NULL DEFAULT FALSE;

INSERT INTO schema_version (version, description)
VALUES (5, 'file history: moves keep their source; rows found by the start scan are flagged')
ON CONFLICT (version) DO NOTHING;
