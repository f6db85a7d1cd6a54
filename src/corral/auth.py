"""The web doors' checks, shared by the REST API (`corral.api.auth`), `/ws` (`corral.api.events`) and the
web UI (`corral.ui.live`): all enforce the same token and the same origin rules the same way.

- The token: when `CORRAL_API_TOKEN` is set, mutations (and `/ws`) need it; reads stay open.
- Origins: a browser sends `Origin` with every WebSocket handshake and every cross-site POST. Only this
  Corral's own origin (the page's host:port is the API's) and the origins listed in
  `CORRAL_ALLOWED_ORIGINS` may open `/ws` or change anything, so a web page on another site cannot
  drive the API from a visitor's browser (CSRF), token or not.
- Hosts: bound to a loopback address, Corral answers only requests addressed to a loopback name (or a
  host of an allowed origin). A page of `evil.example` whose DNS is re-pointed at 127.0.0.1 (DNS
  rebinding) is then refused, although its Origin equals its Host.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def token_accepted(given: str, expected: str | None) -> bool:
    """True when no token is configured, or `given` is it (compared in constant time)."""
    return not expected or hmac.compare_digest(given.encode(), expected.encode())


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header ('' when absent or another scheme)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def normalize_origin(origin: str) -> str:
    """`scheme://host:port`, lower-case, with the scheme's default port made explicit ('' if not an origin)."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def is_loopback(host: str) -> bool:
    """`localhost`, `*.localhost`, 127.0.0.0/8 or ::1 (brackets allowed)."""
    name = host.strip().lower().strip("[]").rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_host(host_header: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + host_header.strip().lower())
        return (parts.hostname or "", parts.port or default_port)
    except ValueError:
        return None


def host_allowed(host_header: str | None, bind_host: str, allowed_origins: Iterable[str]) -> bool:
    """Whether a request addressed to `host_header` may be answered (the DNS-rebinding check).

    Bound to a loopback address, only loopback names are this Corral (and hosts of allowed origins);
    bound to another address (a LAN address, 0.0.0.0), the names it is reached by are unknown: any."""
    if not host_header or not is_loopback(bind_host):
        return True
    split = _split_host(host_header, 80)
    if split is None:
        return False
    hostname = split[0]
    return is_loopback(hostname) or any(urlsplit(o).hostname == hostname for o in allowed_origins if o)


def origin_allowed(origin: str, host_header: str | None, bind_host: str, allowed_origins: Iterable[str]) -> bool:
    """Whether a browser page of `origin` may open `/ws` or send a mutation to this Corral: it is listed in
    `allowed_origins`, or it is the origin the request was addressed to (same-origin: scheme's host and
    port equal the `Host` header), and that host passes `host_allowed`."""
    wanted = normalize_origin(origin)
    if not wanted:
        return False  # "null" (sandboxed frames, file://), garbage
    if wanted in {normalize_origin(o) for o in allowed_origins}:
        return True
    scheme, _, rest = wanted.partition("://")
    origin_host, _, origin_port = rest.rpartition(":")
    split = _split_host(host_header or "", DEFAULT_PORTS[scheme])
    if split is None:
        return False
    hostname, port = split
    same = origin_host.strip("[]") == hostname.strip("[]") and int(origin_port) == port
    return same and host_allowed(host_header, bind_host, allowed_origins)
