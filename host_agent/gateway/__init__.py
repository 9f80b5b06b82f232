"""`host-agent gateway`: the HTTPS ingest service for hosts that do not talk to PostgreSQL."""
