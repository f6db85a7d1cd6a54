"""Traffic counters per service and replica, rendered as Prometheus text (no extra dependency)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    in_flight: int = 0  # filled in by summaries: in-flight is tracked per replica
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))

    def observe(self, seconds: float, error: bool) -> None:
        self.requests += 1
        self.errors += int(error)
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    def summary(self) -> dict[str, float | int]:
        return {"requests": self.requests, "errors": self.errors, "inFlight": self.in_flight,
                "meanLatencyMs": round(1000 * self.latency_sum / self.requests, 3) if self.requests else 0.0}


class TrafficStats:
    def __init__(self) -> None:
        self.by_pair: dict[tuple[str, str], Counters] = defaultdict(Counters)
        self.in_flight_by_replica: dict[str, int] = defaultdict(int)
        # (service, status) of requests never forwarded; a service that does not exist counts as "" (the
        # name is the client's: one label per name would grow without bound)
        self.rejected: dict[tuple[str, int], int] = defaultdict(int)
        self.ejected: Collection[str] = ()  # replicas taken out of rotation by the data plane (failing or hung)

    def start(self, service: str, replica: str) -> None:
        self.in_flight_by_replica[replica] += 1

    def finish(self, service: str, replica: str, seconds: float, error: bool) -> None:
        self.by_pair[(service, replica)].observe(seconds, error)
        self.in_flight_by_replica[replica] -= 1
        if self.in_flight_by_replica[replica] == 0:
            del self.in_flight_by_replica[replica]

    def replica_summary(self, replicas: set[str]) -> dict[str, dict[str, float | int]]:
        merged: dict[str, Counters] = {}
        for (_, replica), c in self.by_pair.items():
            if replica in replicas:
                m = merged.setdefault(replica, Counters())
                m.requests += c.requests
                m.errors += c.errors
                m.latency_sum += c.latency_sum
        for name, m in merged.items():
            m.in_flight = self.in_flight_by_replica.get(name, 0)
        return {name: c.summary() for name, c in sorted(merged.items())}

    def prometheus(self) -> str:
        lines = [
            "# HELP corral_gateway_requests_total Requests forwarded to a replica.",
            "# TYPE corral_gateway_requests_total counter",
        ]
        pairs = sorted(self.by_pair.items())
        lines += [f'corral_gateway_requests_total{{service="{s}",replica="{r}"}} {c.requests}' for (s, r), c in pairs]
        lines += ["# HELP corral_gateway_errors_total Forwarded requests that failed.", "# TYPE corral_gateway_errors_total counter"]
        lines += [f'corral_gateway_errors_total{{service="{s}",replica="{r}"}} {c.errors}' for (s, r), c in pairs]
        lines += ["# HELP corral_gateway_in_flight Requests in flight on a replica.", "# TYPE corral_gateway_in_flight gauge"]
        lines += [f'corral_gateway_in_flight{{replica="{r}"}} {n}' for r, n in sorted(self.in_flight_by_replica.items())]
        lines += ["# HELP corral_gateway_request_seconds Time from request to the end of the response.",
                  "# TYPE corral_gateway_request_seconds histogram"]
        for (s, r), c in pairs:
            for bound, count in zip(LATENCY_BUCKETS, c.buckets, strict=False):  # no buckets: sum and count only
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'corral_gateway_request_seconds_bucket{{service="{s}",replica="{r}",le="{le}"}} {count}')
            lines.append(f'corral_gateway_request_seconds_sum{{service="{s}",replica="{r}"}} {c.latency_sum:.6f}')
            lines.append(f'corral_gateway_request_seconds_count{{service="{s}",replica="{r}"}} {c.requests}')
        lines += ["# HELP corral_gateway_ejected Replicas the data plane took out of rotation (unreachable or hung) until healthy.",
                  "# TYPE corral_gateway_ejected gauge"]
        lines += [f'corral_gateway_ejected{{replica="{r}"}} 1' for r in sorted(self.ejected)]
        lines += ["# HELP corral_gateway_rejected_total Requests answered by the gateway itself (400, 404, 413, 503, 504).",
                  "# TYPE corral_gateway_rejected_total counter"]
        lines += [f'corral_gateway_rejected_total{{service="{s}",code="{code}"}} {n}' for (s, code), n in sorted(self.rejected.items())]
        return "\n".join(lines) + "\n"
