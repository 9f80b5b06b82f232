"""Shipping local rows to PostgreSQL: the sink, the sync engine, its loop and journal."""
