"""The server: domain orchestration, request validation, gRPC servicers, the interceptor (the one
error map), auth, settings and the composition root."""
