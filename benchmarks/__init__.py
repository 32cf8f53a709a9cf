"""`make bench`: speed measured side by side in one run, never in tests."""
