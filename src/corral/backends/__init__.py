"""Backends: where replicas, services and their labels really live.

The controller (validation, planning, history, events) is written once against `Backend`; a
backend only carries out already-validated changes.
"""
