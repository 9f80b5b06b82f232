"""host-agent: workstation activity recorded locally and shipped to a central PostgreSQL."""

__version__ = "0.1.0"
