"""One module per resource. Paths are written in full, so metrics and logs see real routes."""

API_PREFIX = "/api/v1"
