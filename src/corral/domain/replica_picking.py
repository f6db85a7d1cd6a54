"""Which replica of a business service takes the next request: filter → score → pick (pure).

A business service picks by one of two policies (`routing.policy` on the service):

- **least-load** (the default): the replica with the fewest requests in flight at the gateway; ties at random.
- **prefix-aware**: each candidate gets a weighted sum of scores (llm-d's inference scheduler: filter, score,
  pick), highest wins:
  - *prefix*: the share of the prompt's leading blocks recently served by that replica (an approximate prefix
    cache, like SGLang's cache-aware router: the engine most likely still holds those blocks' KV cache, and a
    hit skips their prefill). The prompt's text is cut into blocks of `BLOCK_BYTES`; key k is the CRC-32 of
    the first k blocks (at most `MAX_BLOCKS`), and `Affinity` maps each key to the last `OWNERS` replicas that
    served it, most recent first (a hot prefix that overflowed its replica is cached on a second one too, and
    both count) — bounded, least recently used key first out;
  - *queue*: 1 − (requests in flight at the gateway + the engine's waiting count) / (the busiest candidate's + 1);
  - *kv*: 1 − the engine's KV-cache usage (unknown: 0).
  Equal scores go to the candidate whose name hashes highest with the prompt's first key (rendezvous hashing),
  so a tenant's conversations land on the same replica even before any affinity was recorded, and on both
  data planes alike.

Filters come first, for every policy: a replica at its batch limit is no candidate while another has room (the
gateway's hold queue takes the request when every replica is full), and a request whose `model` names a LoRA
adapter goes only to replicas that report it loaded (`adapter_holders`), so it never meets the engine's 404 of a
replica that has not loaded it yet (corral/adapters.py); a name no replica reports loaded (a tag, a typo) is not
filtered: the engine answers it.

The nginx data plane runs the same steps in Lua (`pick` in gateway/nginx/corral_gateway.lua) over the same bytes
(`ngx.crc32_long` is zlib's CRC-32), in the same floating-point order, so both planes make the same choice.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

BLOCK_BYTES = 256  # prompt text per block (~64 tokens): the granularity of a prefix match
MAX_BLOCKS = 64  # keys per request: a match is judged on the first 16 KiB of prompt text at most
AFFINITY_ENTRIES = 100_000  # keys remembered, ~20 MB (the Python plane; nginx: a shared dict of `AFFINITY_DICT`)
OWNERS = 3  # replicas remembered per key
WEIGHT_MAX = 100.0
MAX_ROUTING_BODY = 1024 * 1024  # a request body larger than this is not read for its prompt (least load)


class RoutingPolicy(StrEnum):
    LEAST_LOAD = "least-load"
    PREFIX_AWARE = "prefix-aware"


@dataclass(frozen=True)
class RoutingWeights:
    """The prefix-aware scorers' weights (each 0-100). A prefix hit skips prefill, the dominant cost of a long
    prompt, and a full replica is filtered out anyway: the prefix outweighs load, so a conversation stays where
    its cache is until that replica fills up (a match of over 2/5 of the prompt beats the idlest replica)."""

    prefix: float = 5.0
    queue: float = 1.0
    kv_cache: float = 1.0

    def wire(self) -> dict[str, float]:
        return {"prefix": self.prefix, "queue": self.queue, "kvCache": self.kv_cache}


@dataclass(frozen=True)
class Routing:
    """A business service's replica picking."""

    policy: RoutingPolicy = RoutingPolicy.LEAST_LOAD
    weights: RoutingWeights = field(default_factory=RoutingWeights)

    def wire(self) -> dict[str, Any]:
        return {"policy": self.policy.value, "weights": self.weights.wire()}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any] | None) -> Routing:
        """From the stored JSON (already validated by the API); None: the default."""
        if not raw:
            return cls()
        weights = raw.get("weights") or {}
        defaults = RoutingWeights()
        return cls(RoutingPolicy(raw.get("policy", RoutingPolicy.LEAST_LOAD.value)),
                   RoutingWeights(prefix=float(weights.get("prefix", defaults.prefix)),
                                  queue=float(weights.get("queue", defaults.queue)),
                                  kv_cache=float(weights.get("kvCache", defaults.kv_cache))))


@dataclass(frozen=True)
class ReplicaInputs:
    """What the engine says about a replica (the control plane's scrape of its /metrics, its loaded adapters)."""

    waiting: float | None = None
    kv_cache_usage: float | None = None
    adapters: frozenset[str] = frozenset()

    def wire(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "kv": self.kv_cache_usage, "adapters": sorted(self.adapters)}


@dataclass(frozen=True)
class PickRequest:
    """What picking reads of a request: the `model` it names and its prompt's prefix keys."""

    model: str | None = None
    keys: tuple[int, ...] = ()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: the text ones, in order
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_bytes(payload: Any) -> bytes:
    """The prompt's leading text as bytes: each chat message as `role\\ncontent\\n`, or a completion's `prompt`
    string; cut at `MAX_BLOCKS` blocks. The Lua plane builds the same bytes from the same JSON."""
    limit = BLOCK_BYTES * MAX_BLOCKS
    if not isinstance(payload, dict):
        return b""
    messages = payload.get("messages")
    if isinstance(messages, list):
        out = bytearray()
        for message in messages:
            if len(out) >= limit:
                break
            if isinstance(message, dict):
                role = message.get("role")
                out += ((role if isinstance(role, str) else "") + "\n" + _text(message.get("content")) + "\n").encode(
                    "utf-8", "surrogatepass")
        return bytes(out[:limit])
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt.encode("utf-8", "surrogatepass")[:limit]
    return b""


def prefix_keys(prompt: bytes) -> tuple[int, ...]:
    """Key k = CRC-32 of the first k whole blocks: two prompts share key k when they share k blocks."""
    return tuple(zlib.crc32(prompt[:k * BLOCK_BYTES]) for k in range(1, min(len(prompt) // BLOCK_BYTES, MAX_BLOCKS) + 1))


def read_request(body: bytes) -> PickRequest:
    """The request's `model` and prefix keys (nothing from a body that is not a JSON object)."""
    if len(body) > MAX_ROUTING_BODY:
        return PickRequest()
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return PickRequest()
    if not isinstance(payload, dict):
        return PickRequest()
    model = payload.get("model")
    return PickRequest(model if isinstance(model, str) else None, prefix_keys(prompt_bytes(payload)))


class Affinity:
    """Prefix key → the last `OWNERS` replicas that served it (most recent first); at most `capacity` keys, the
    least recently used out."""

    def __init__(self, capacity: int = AFFINITY_ENTRIES) -> None:
        self.capacity = capacity
        self._owners: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def matches(self, keys: Sequence[int], candidates: Collection[str]) -> dict[str, int]:
        """Candidate → how many leading blocks of the prompt it served recently (its deepest key)."""
        depth: dict[str, int] = {}
        for k in range(len(keys), 0, -1):
            for owner in self._owners.get(keys[k - 1], ()):
                if owner in candidates and owner not in depth:
                    depth[owner] = k
        return depth

    def record(self, keys: Iterable[int], replica: str) -> None:
        for key in keys:
            before = self._owners.get(key, ())
            self._owners[key] = (replica, *[o for o in before if o != replica][:OWNERS - 1])
            self._owners.move_to_end(key)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)


def adapter_holders(model: str | None, targets: Iterable[str], inputs: Mapping[str, ReplicaInputs]) -> frozenset[str] | None:
    """The replicas that report `model` loaded as a LoRA adapter; None when none does (no filter)."""
    if not model:
        return None
    holders = frozenset(t for t in targets if (i := inputs.get(t)) is not None and model in i.adapters)
    return holders or None


def rendezvous(key: int, replica: str) -> int:
    return zlib.crc32(f"{key}:{replica}".encode())


def scores(candidates: Sequence[str], weights: RoutingWeights, in_flight: Mapping[str, int],
           inputs: Mapping[str, ReplicaInputs], depth: Mapping[str, int], blocks: int) -> dict[str, float]:
    """Each candidate's weighted score (higher is better); the Lua plane computes the same expression."""
    queue = {c: in_flight.get(c, 0) + ((i.waiting or 0.0) if (i := inputs.get(c)) else 0.0) for c in candidates}
    scale = max(queue.values()) + 1.0
    out: dict[str, float] = {}
    for c in candidates:
        i = inputs.get(c)
        prefix = depth.get(c, 0) / blocks if blocks else 0.0
        kv = 1.0 - ((i.kv_cache_usage or 0.0) if i else 0.0)
        out[c] = weights.prefix * prefix + weights.queue * (1.0 - queue[c] / scale) + weights.kv_cache * kv
    return out


def pick(candidates: Sequence[str], routing: Routing, in_flight: Mapping[str, int],
         inputs: Mapping[str, ReplicaInputs], keys: Sequence[int], affinity: Affinity,
         rng: random.Random | None = None) -> str:
    """One of `candidates` (already filtered: in rotation, below their batch limit, holding the adapter asked for).
    Prefix-aware records the choice in `affinity`."""
    if routing.policy is RoutingPolicy.LEAST_LOAD:
        fewest = min(in_flight.get(c, 0) for c in candidates)
        return (rng or random).choice([c for c in candidates if in_flight.get(c, 0) == fewest])
    scored = scores(candidates, routing.weights, in_flight, inputs, affinity.matches(keys, candidates), len(keys))
    best = max(scored.values())
    tied = [c for c in candidates if scored[c] == best]
    if len(tied) == 1:
        chosen = tied[0]
    elif keys:
        chosen = max(tied, key=lambda c: (rendezvous(keys[0], c), c))
    else:
        chosen = (rng or random).choice(tied)
    affinity.record(keys, chosen)
    return chosen
