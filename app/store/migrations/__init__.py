"""Alembic migrations of the app database (env.py runs them; versions/ holds them)."""
