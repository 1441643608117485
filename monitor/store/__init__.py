"""The SQL store: schema, engine and queries."""
