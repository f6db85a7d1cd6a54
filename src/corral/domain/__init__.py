"""Pure decisions, no I/O: every function here takes values and returns values.

Keeping the rules apart from processes, HTTP and the database lets both backends (local and
Kubernetes) share them, and lets the unit and property tests cover them exhaustively and fast.
"""
