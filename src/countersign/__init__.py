"""Countersign: a self-hosted server for AI-agent conversations."""
