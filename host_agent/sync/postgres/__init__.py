"""The PostgreSQL side of sync: the sink, its schema, the table plan, and error translation."""
