"""Plain domain values, events and errors: no I/O, no framework."""
