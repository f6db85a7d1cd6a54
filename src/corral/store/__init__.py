"""Persistent state: SQLite (WAL) through SQLAlchemy 2, so PostgreSQL can replace it by URL."""
