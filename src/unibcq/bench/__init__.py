"""Benchmarks that print tables (speed and quality targets live here, not in unit tests)."""
