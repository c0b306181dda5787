"""Serving-engine integrations of llmdist (each imports its engine only when used)."""
