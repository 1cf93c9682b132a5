"""The database: engine, tables, repositories, unit of work, migrations and the doctor."""
