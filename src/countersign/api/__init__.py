"""The HTTP API: routes, schemas, dependencies, the error mapping and the SSE generator."""
