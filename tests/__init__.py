"""llmdist's test suite (a package: its modules import each other by relative imports)."""
