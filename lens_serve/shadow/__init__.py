"""Shadow scoring: measure other working contexts off the request path and log them as
preference records."""
