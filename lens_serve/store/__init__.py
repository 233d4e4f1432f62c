"""Redis: the session token log, the preference stream, the registry of published LensNet and
GistNet versions, and the embedded redis-server. Never imports the service layer."""
