"""The server's routers."""
