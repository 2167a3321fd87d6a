"""Integrations with other libraries (transformers registration)."""
