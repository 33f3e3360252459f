"""Reports across runs."""
