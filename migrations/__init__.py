"""Alembic migrations of the claude-monitor schema."""
