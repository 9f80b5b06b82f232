-- Version 4: least privilege per host.
--
-- `host-agent admin add-host NAME` creates a login role for one host and records it here; row
-- level security then lets that role insert, update and read only rows whose host_identifier
-- is NAME, and add only its own sync_logs rows. Roles not registered here are not restricted
-- by these policies (the table owner, and any role an existing setup granted rights to), so
-- upgrading changes nothing for them. Members of host_agent_host get the table rights a host
-- needs; the policies narrow them to its own rows.

CREATE TABLE IF NOT EXISTS host_agent_hosts (
    host_identifier TEXT PRIMARY KEY,
    role_name       NAME UNIQUE,
    token_sha256    TEXT UNIQUE,         -- a gateway token's hash (the token is shown once)
    created_at      TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    revoked_at      TIMESTAMP WITH TIME ZONE
);

-- The host a login role may write, or NULL for a role that is not a registered host.
-- SECURITY DEFINER: host roles need not read the registry itself.
CREATE OR REPLACE FUNCTION host_agent_host_of(role NAME)
RETURNS TEXT LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT host_identifier FROM public.host_agent_hosts
     WHERE role_name = role AND revoked_at IS NULL
$$;

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'host_agent_host') THEN
        IF EXISTS (SELECT 1 FROM pg_roles
                    WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            CREATE ROLE host_agent_host NOLOGIN;
        ELSE
            RAISE NOTICE 'host_agent_host not created (needs CREATEROLE): run init-db as an '
                         'administrator before using host-agent admin add-host';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'host_agent_host') THEN
        GRANT USAGE ON SCHEMA public TO host_agent_host;
        GRANT SELECT ON schema_version TO host_agent_host;
        GRANT SELECT, INSERT, UPDATE ON desktop_activity_sessions, file_change_events
            TO host_agent_host;
        GRANT SELECT, INSERT ON sync_logs TO host_agent_host;
        GRANT USAGE ON SEQUENCE sync_logs_id_seq TO host_agent_host;
        GRANT EXECUTE ON FUNCTION host_agent_host_of(NAME) TO host_agent_host;
    END IF;
END
$roles$;

DO $policies$
DECLARE
    t text;
    own text := '(SELECT host_agent_host_of(current_user)) IS NULL '
                'OR host_identifier = (SELECT host_agent_host_of(current_user))';
BEGIN
    FOREACH t IN ARRAY ARRAY['desktop_activity_sessions', 'file_change_events', 'sync_logs']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        IF NOT EXISTS (SELECT 1 FROM pg_policies
                        WHERE tablename = t AND policyname = 'host_agent_own_rows_read') THEN
            EXECUTE format('CREATE POLICY host_agent_own_rows_read ON %I FOR SELECT USING (%s)',
                           t, own);
            EXECUTE format('CREATE POLICY host_agent_own_rows_insert ON %I FOR INSERT '
                           'WITH CHECK (%s)', t, own);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_policies
                        WHERE tablename = t AND policyname = 'host_agent_others_delete') THEN
            -- Hosts never delete; other roles keep whatever DELETE right they were granted.
            EXECUTE format('CREATE POLICY host_agent_others_delete ON %I FOR DELETE '
                           'USING ((SELECT host_agent_host_of(current_user)) IS NULL)', t);
        END IF;
        IF t <> 'sync_logs' AND NOT EXISTS (
                SELECT 1 FROM pg_policies
                 WHERE tablename = t AND policyname = 'host_agent_own_rows_update') THEN
            EXECUTE format('CREATE POLICY host_agent_own_rows_update ON %I FOR UPDATE '
                           'USING (%s) WITH CHECK (%s)', t, own, own);
        END IF;
    END LOOP;
END
$policies$;

INSERT INTO schema_version (version, description)
VALUES (4, 'host roles: each host writes and reads only its own rows')
ON CONFLICT (version) DO NOTHING;
