-- Version 6: a read-only role for dashboards (the compose stack's Grafana).
--
-- host_agent_reader may read the collected rows and sync_logs and nothing else: no writes, no
-- host registry (host_agent_hosts and its token hashes), no schema changes. It is made NOLOGIN:
-- give it a login of its own (`ALTER ROLE host_agent_reader LOGIN PASSWORD '...'`, what the
-- compose stack does with GRAFANA_DB_PASSWORD from .env in services/grafana/reader-login.sh),
-- or grant it to a login you have (`GRANT host_agent_reader TO alice`). It is not a registered
-- host, so the row level security of version 4 lets it read every host's rows. A statement of
-- its runs at most a minute, so a heavy dashboard or an ad hoc query in Grafana's Explore can't
-- hold the server the agents ship to. Creating it needs CREATEROLE, like host_agent_host.
-- The agent itself does not need this version.

DO $reader$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'host_agent_reader') THEN
        IF EXISTS (SELECT 1 FROM pg_roles
                    WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            BEGIN
                CREATE ROLE host_agent_reader NOLOGIN;
                ALTER ROLE host_agent_reader SET statement_timeout = '60s';
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                -- Roles belong to the whole cluster: init-db of another database on the same
                -- server created it at the same moment. Its settings are that run's to make.
                NULL;
            END;
        ELSE
            RAISE NOTICE 'host_agent_reader not created (needs CREATEROLE): run init-db as an '
                         'administrator before pointing dashboards at this database';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'host_agent_reader') THEN
        GRANT USAGE ON SCHEMA public TO host_agent_reader;
        GRANT SELECT ON desktop_activity_sessions, file_change_events, sync_logs
            TO host_agent_reader;
    END IF;
END
$reader$;

INSERT INTO schema_version (version, description)
VALUES (6, 'host_agent_reader: a read-only role for dashboards')
ON CONFLICT (version) DO NOTHING;
