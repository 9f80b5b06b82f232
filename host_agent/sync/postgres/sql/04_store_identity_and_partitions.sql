-- Version 3: a store identity in every row's key, and event tables partitioned by month.
--
-- store_id: every local SQLite store has a random identity made when it is created, so a
-- reinstalled agent (or a cloned VM) that reuses a host_identifier with a fresh store, whose
-- ids restart at 1, never collides with the rows of the old store. Rows that existed before
-- this version keep their identity: they get the nil UUID, and so do the local stores that
-- already held rows when they were migrated.
--
-- Partitions: each event table is partitioned by month of a time that never changes once a
-- row is written (file_change_events.event_time; desktop_activity_sessions.created_at, since a
-- session's start moves when idle is found late). A DEFAULT partition takes any row no monthly
-- partition covers, so no row is ever refused for its date; `host-agent admin maintain`
-- creates the coming months, moves rows out of the default partition and drops old months.
-- A unique key of a partitioned table must hold the partition column, so the identity is
-- (host_identifier, store_id, source_id, <partition column>): the same row, since the last one
-- never changes. host_identifier leads every unique key (the distribution column on Citus).
--
-- Existing unpartitioned tables are converted in place, rows kept. Idempotent: the whole
-- migration is one statement and runs once (schema_version 3 records it).

CREATE OR REPLACE FUNCTION host_agent_partition_name(parent regclass, month date)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT parent::text || '_p' || to_char(month, 'YYYYMM')
$$;

-- The partition of `parent` for the month holding `month`, created when missing, with the
-- rows of that month moved out of the default partition first (one transaction).
-- Months are UTC months, whatever the session's time zone. Returns true when it created one.
CREATE OR REPLACE FUNCTION host_agent_ensure_partition(parent regclass, month date)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    lower timestamptz := first_day::timestamp AT TIME ZONE 'UTC';
    upper timestamptz := (first_day + interval '1 month')::timestamp AT TIME ZONE 'UTC';
    name text := host_agent_partition_name(parent, first_day);
    key text;
    default_part regclass := to_regclass(parent::text || '_default');
    moved bigint := 0;
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    SELECT a.attname INTO key
      FROM pg_partitioned_table p
      JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = parent;
    EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   name, parent);
    IF default_part IS NOT NULL THEN
        -- Agents keep writing meanwhile: a row of this month that entered the default
        -- partition after the move would make the ATTACH below fail. Writers to the default
        -- partition wait for this transaction instead (readers and other months go on).
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', default_part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %s WHERE %I >= %L AND %I < %L RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved',
            default_part, key, lower, key, upper, name);
    END IF;
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, name, lower, upper);
    RETURN true;
END
$$;

DO $migration$
DECLARE
    spec record;
    old_name text;
    month date;
BEGIN
    IF EXISTS (SELECT 1 FROM schema_version WHERE version = 3) THEN
        RETURN;
    END IF;
    FOR spec IN
        SELECT * FROM (VALUES
            ('desktop_activity_sessions', 'created_at', 'idx_desktop_activity_start_time',
             'start_time'),
            ('file_change_events', 'event_time', 'idx_file_change_events_event_time',
             'event_time')
        ) AS t(name, key, time_index, time_column)
    LOOP
        IF EXISTS (SELECT 1 FROM pg_partitioned_table
                    WHERE partrelid = to_regclass(spec.name)) THEN
            CONTINUE;
        END IF;
        old_name := spec.name || '_unpartitioned';
        EXECUTE format('ALTER TABLE %I RENAME TO %I', spec.name, old_name);
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT IF EXISTS %I',
                       old_name, spec.name || '_host_source');
        EXECUTE format('DROP INDEX IF EXISTS %I', spec.time_index);
        EXECUTE format(
            'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
            'PARTITION BY RANGE (%I)', spec.name, old_name, spec.key);
        EXECUTE format(
            'ALTER TABLE %I ADD COLUMN store_id uuid NOT NULL '
            'DEFAULT ''00000000-0000-0000-0000-000000000000''', spec.name);
        EXECUTE format('ALTER TABLE %I ALTER COLUMN store_id DROP DEFAULT', spec.name);
        EXECUTE format(
            'ALTER TABLE %I ADD CONSTRAINT %I UNIQUE (host_identifier, store_id, source_id, %I)',
            spec.name, spec.name || '_identity', spec.key);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT',
                       spec.name || '_default', spec.name);
        EXECUTE format('CREATE INDEX %I ON %I (%I)', spec.time_index, spec.name,
                       spec.time_column);
        -- Months that hold rows, and this one and the next two, get their partitions.
        FOR month IN EXECUTE format(
            'SELECT DISTINCT date_trunc(''month'', %I AT TIME ZONE ''UTC'')::date FROM %I '
            'UNION SELECT (date_trunc(''month'', now() AT TIME ZONE ''UTC'') '
            '+ n * interval ''1 month'')::date FROM generate_series(0, 2) AS n',
            spec.key, old_name)
        LOOP
            PERFORM host_agent_ensure_partition(spec.name::regclass, month);
        END LOOP;
        EXECUTE format(
            'INSERT INTO %I SELECT *, ''00000000-0000-0000-0000-000000000000''::uuid FROM %I',
            spec.name, old_name);
        EXECUTE format('DROP TABLE %I', old_name);
    END LOOP;

    -- sync_logs: which store a run was of; host_identifier leads its key.
    ALTER TABLE sync_logs ADD COLUMN IF NOT EXISTS store_id uuid;
    UPDATE sync_logs SET host_identifier = '(none)' WHERE host_identifier IS NULL;
    ALTER TABLE sync_logs ALTER COLUMN host_identifier SET NOT NULL;
    ALTER TABLE sync_logs DROP CONSTRAINT IF EXISTS sync_logs_pkey;
    ALTER TABLE sync_logs ADD CONSTRAINT sync_logs_pkey PRIMARY KEY (host_identifier, id);
    CREATE INDEX IF NOT EXISTS idx_sync_logs_run
        ON sync_logs (host_identifier, table_name, sync_started_at);

    INSERT INTO schema_version (version, description)
    VALUES (3, 'store identity in every key; event tables partitioned by month');
END
$migration$;
