"""Integrations with other tools (not architectures; not imported when a model is wrapped)."""
