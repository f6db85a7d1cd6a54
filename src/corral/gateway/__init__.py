"""The local data plane: each service is a base URL whose traffic reaches only the replicas it selects.

`routing` (which replicas a service may use: a pure function of services and pods), `policies`
(which of those takes the next request), `stats` (counters and Prometheus text), `proxy` (the ASGI
proxy that forwards, streams, ejects and retries).
"""
