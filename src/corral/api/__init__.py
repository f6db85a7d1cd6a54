"""HTTP surface: spec 01's `/api/...` paths with its JSON field names, and `/ws` for live events."""
