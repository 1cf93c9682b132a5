"""pydantic-ai glue: models by name, tools, and one agent turn; never touches the database."""
