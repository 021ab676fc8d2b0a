"""calibserve: merge."""
