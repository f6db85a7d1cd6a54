"""The virtual token counter (domain/fairness.py): who goes next among held requests."""

from __future__ import annotations

from collections import Counter, deque

from corral.domain.fairness import COMPLETION_COST, VirtualCounters, prompt_estimate


def test_the_key_served_least_goes_first_and_ties_go_in_arrival_order() -> None:
    fair = VirtualCounters()
    assert fair.first([]) is None
    assert fair.first(["a", "b", "a"]) == 0  # all at zero: first come first served
    fair.settle(fair.dispatch("a", 1, 400), 100, 10)
    assert fair.counter("a") == 100 + COMPLETION_COST * 10  # the estimate replaced by the engine's prompt count
    assert fair.first(["a", "a", "b"]) == 2


def test_a_key_back_from_a_quiet_spell_banks_nothing() -> None:
    """Lifted to the least counter among the held keys when it joins (or to the floor with nobody held)."""
    fair = VirtualCounters()
    for _ in range(100):
        fair.settle(fair.dispatch("noisy", 1, 400), 100, 50)
    fair.join("quiet", ["noisy", "noisy"])
    assert fair.counter("quiet") == fair.counter("noisy")  # equal footing, not 20,000 tokens of credit
    before = fair.counter("noisy")
    fair.join("noisy", ["noisy"])
    assert fair.counter("noisy") == before  # it was held already: unchanged
    fair.join("late", [])
    assert 0 < fair.counter("late") <= fair.counter("noisy")  # the floor: the last request let go


def test_weights_share_the_tokens_served_in_their_ratio() -> None:
    """Two keys always backlogged, one of weight 3: served alternately by the rule, the heavy one gets 3× the requests."""
    fair = VirtualCounters()
    served: Counter[str] = Counter()
    weights = {"light": 1, "heavy": 3}
    for _ in range(400):
        key = ["light", "heavy"][fair.first(["light", "heavy"]) or 0]
        fair.settle(fair.dispatch(key, weights[key], 40), 10, 20)
        served[key] += 1
    assert abs(served["heavy"] / served["light"] - 3) < 0.1


def test_the_prompt_estimate_is_positive() -> None:
    assert prompt_estimate(0) == 1 and prompt_estimate(4000) == 1000


async def test_a_freed_place_wakes_the_fair_next_request_that_can_take_it() -> None:
    """The Python plane's hold queue: a place freed on a replica wakes the held request of the key served least, but
    passes over one that may only go to replicas holding its adapter when none of those is free (woken, it would
    find nothing and the place would idle while the others wait)."""
    from corral.domain.replica_picking import ReplicaInputs
    from corral.gateway.policies import LeastOutstanding
    from corral.gateway.proxy import Gateway, _Waiter
    from corral.gateway.routing import Route, Target

    gateway = Gateway(LeastOutstanding(), 1.0, 1.0, health_path=lambda _: "/health")
    route = Route("svc", "m", "b", "pool", (Target("a", "http://127.0.0.1:1", concurrency=1),
                                            Target("b", "http://127.0.0.1:2", concurrency=1)))
    gateway.set_table({"svc": route})
    gateway.inputs = {"a": ReplicaInputs(adapters=frozenset({"sql-lora"}))}
    gateway.stats.in_flight_by_replica.update({"a": 1, "b": 0})  # a place free on b only
    fair = gateway._fairness("svc")
    fair.dispatch("noisy", 1, 4000)  # noisy has been served 1,000 tokens, quiet nothing
    lora, noisy, quiet = _Waiter("quiet", "sql-lora"), _Waiter("noisy"), _Waiter("quiet")
    gateway._held["svc"] = deque([lora, noisy, quiet])
    gateway._wake_first("svc")
    assert quiet.woken and not lora.woken and not noisy.woken  # quiet's adapter request cannot use b
    gateway._wake_first("svc")
    assert noisy.woken and not lora.woken
    gateway._wake_first("svc")
    assert not lora.woken  # still nowhere to go
    gateway.inputs = {"a": ReplicaInputs(adapters=frozenset({"sql-lora"})), "b": ReplicaInputs(adapters=frozenset({"sql-lora"}))}
    gateway._wake_first("svc")
    assert lora.woken  # its adapter loaded on b while it waited: read again at the wake
