"""The HTTP layer both servers share: a uvicorn server with limits and drain, and the daemon's API routes."""
