"""The embedded default backend: replicas are engine processes on this machine, state is SQLite."""

from corral.backends.local.backend import LocalBackend

__all__ = ["LocalBackend"]
