"""Real parts for tests: a PostgreSQL server, migrated databases, server processes."""
