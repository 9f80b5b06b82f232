"""The embedded PostgreSQL: a private cluster the agent starts when no server is configured."""
