"""``python -m countersign`` runs the CLI."""

from countersign.cli import main

main()
