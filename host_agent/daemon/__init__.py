"""The long-running agent: assembly of its parts, the lock, systemd readiness, health/metrics."""
