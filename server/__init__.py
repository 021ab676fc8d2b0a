"""calibserve: server."""
