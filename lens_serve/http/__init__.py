"""The OpenAI-compatible HTTP endpoint beside gRPC: its request bodies (`protocol`), response
bodies (`responses`), the FastAPI app on the domain service (`openai_api`) and its uvicorn server
(`server`). No gRPC here."""
