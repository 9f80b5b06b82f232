-- Version 7: bundles applied by `host-agent import` and by the gateway.
--
-- A bundle's id is its transaction id: a bundle found here was applied already, so importing
-- it again (a second USB trip, a gateway request retried after a lost answer) changes nothing
-- and answers with the receipt it got the first time. host_identifier leads the key, as in
-- every table a host writes (the distribution column on Citus).

CREATE TABLE IF NOT EXISTS imported_bundles (
    host_identifier TEXT NOT NULL,
    bundle_id       UUID NOT NULL,
    rows            INTEGER NOT NULL,
    sha256          TEXT NOT NULL,
    receipt         JSONB NOT NULL,
    created_at      TIMESTAMP WITH TIME ZONE NOT NULL,     -- when the host wrote the bundle
    imported_at     TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT CURRENT_TIMESTAMP,
    via             TEXT NOT NULL,                          -- import or gateway
    PRIMARY KEY (host_identifier, bundle_id)
);

INSERT INTO schema_version (version, description)
VALUES (7, 'imported bundles: applying a bundle twice changes nothing')
ON CONFLICT (version) DO NOTHING;
