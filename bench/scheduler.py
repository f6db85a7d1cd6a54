"""The finetune queue policy on a simulated trace: utilisation and makespan, and decision time.

    python bench/scheduler.py [--tasks 200] [--gpus 8] [--seed 7] [--seeds 1-80] [--slack-minutes 60] [--arrival-minutes 3]

A discrete-event simulation that calls the real `corral.domain.queue.schedule` at every arrival and
completion. Tasks want 1, 2, 4 or 8 GPUs (80 GB each), 10–70 GB per GPU, 10–120 minutes, arriving
about every 3 minutes with mixed priorities. Compared in the same run: spec 02's original queue (one
task on the whole machine at a time, FIFO), `strict-fifo`, `best-effort-fifo` and `easy-backfill` on all
GPUs (the last with exact run-time estimates, with timeouts 1–3× the run time, and with every timeout the
6 h default — the manager's estimates are the tasks' timeouts), both as pure EASY and with Corral's default slack
(`CORRAL_BACKFILL_SLACK_S`, or `--slack-minutes`), and the lower bound max(total GPU-minutes / GPUs, last arrival + its
duration). `--seeds` adds easy-backfill's makespan over other seeds' traces, with no slack, half, the default and twice
default slack, to tell one trace's luck from the policy's.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from corral.config import Settings
from corral.domain.queue import (
    Capacity,
    Demand,
    Priority,
    RunningTask,
    Strategy,
    Unit,
    WaitingTask,
    carried_promises,
    schedule,
)

GB = 1024**3


def make_trace(n: int, seed: int, arrival_minutes: float = 3.0) -> list[tuple[WaitingTask, float]]:
    """Every `arrival_minutes` on average: 3 makes a backlog of about two days on 8 GPUs; from about 20 on, the GPUs
    keep up (a task wants 2.4 GPUs for 65 minutes on average)."""
    rng = random.Random(seed)
    trace, at = [], 0.0
    for i in range(n):
        at += rng.expovariate(1 / arrival_minutes)
        gpus = rng.choices([1, 2, 4, 8], weights=[50, 25, 15, 10])[0]
        task = WaitingTask(f"t{i:04d}", rng.choices(list(Priority), weights=[10, 70, 20])[0], at,
                           Demand(gpus, rng.uniform(10, 70) * GB))
        trace.append((task, rng.uniform(10, 120)))
    return trace


def simulate(trace: list[tuple[WaitingTask, float]], n_gpus: int, strategy: Strategy, whole_machine: bool,
             overestimate: float = 1.0, seed: int = 0, timeout: float | None = None, slack: float = 0.0) -> dict[str, float]:
    """easy-backfill's estimates (what the manager gives it: the tasks' timeouts) are each task's duration × a
    factor drawn uniformly from [1, `overestimate`] (1.0: exact), or the same `timeout` for every task; `slack`:
    its `backfill_slack_s` (minutes here), with each head's promised start carried between rounds as the manager
    does."""
    duration = {t.id: d for t, d in trace}
    rng = random.Random(seed)
    estimate = {t.id: timeout if timeout else d * rng.uniform(1.0, overestimate) for t, d in trace}
    arrivals = sorted(trace, key=lambda x: x[0].submitted_at)
    events: list[tuple[float, int, str, tuple[str, ...]]] = []  # (time, kind 0=finish 1=arrival, task, units)
    for task, _ in arrivals:
        heapq.heappush(events, (task.submitted_at, 1, task.id, ()))
    tasks = {t.id: replace(t, estimated_s=estimate[t.id]) for t, _ in trace}
    waiting: dict[str, WaitingTask] = {}
    free = {str(i) for i in range(n_gpus)}
    running: dict[str, RunningTask] = {}
    waits: dict[Priority, list[float]] = {p: [] for p in Priority}
    whole_machine_waits: list[float] = []  # tasks that want every GPU: those a slack may delay
    busy, now = 0.0, 0.0
    while events:
        now, kind, tid, units = heapq.heappop(events)
        if kind == 1:
            waiting[tid] = tasks[tid]
        else:
            free |= set(units)
            del running[tid]
        if whole_machine and running:
            continue  # the original queue: one task owns the machine
        capacity = Capacity(tuple(Unit(u, 80 * GB) for u in sorted(free)), running=tuple(running.values()), now=now)
        decision = schedule(list(waiting.values()), capacity, strategy, backfill_slack_s=slack)
        for bid in decision.bypassed:
            waiting[bid] = replace(waiting[bid], bypassed=waiting[bid].bypassed + 1)
        for tid, promise in carried_promises(list(waiting.values()), decision).items():
            waiting[tid] = replace(waiting[tid], promised_start=promise)
        for start_id, got in decision.starts:
            if whole_machine and running:
                break
            task = waiting.pop(start_id)
            free -= set(got)
            running[start_id] = RunningTask(start_id, tuple(Unit(u, 80 * GB) for u in got), now + estimate[start_id])
            waits[task.priority].append(now - task.submitted_at)
            if task.demand.gpus == n_gpus:
                whole_machine_waits.append(now - task.submitted_at)
            busy += duration[start_id] * len(got)
            heapq.heappush(events, (now + duration[start_id], 0, start_id, got))
    return {"makespan": now, "utilisation": busy / (n_gpus * now), "mean_wait": statistics.mean(sum(waits.values(), [])),
            "high_wait": statistics.mean(waits[Priority.HIGH]) if waits[Priority.HIGH] else 0.0,
            "all_gpus_wait": statistics.mean(whole_machine_waits) if whole_machine_waits else 0.0}


def lower_bound(trace: list[tuple[WaitingTask, float]], n_gpus: int) -> float:
    work = sum(d * t.demand.gpus for t, d in trace) / n_gpus
    return max(work, max(t.submitted_at + d for t, d in trace))


def decision_time(n_queued: int, n_gpus: int, strategy: Strategy) -> float:
    trace = make_trace(n_queued, seed=1)
    capacity = Capacity(tuple(Unit(str(i), 80 * GB) for i in range(n_gpus)))
    tasks = [replace(t, estimated_s=d) for t, d in trace]  # easy-backfill reserves from the estimates
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        schedule(tasks, capacity, strategy)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1000


def seed_sweep(console: Console, seeds: list[int], n_tasks: int, n_gpus: int, slack: float, arrival_minutes: float) -> None:
    estimates = {"exact estimates": 1.0, "timeouts 1-3× the run time": 3.0}
    found: dict[tuple[float, str], list[dict[str, float]]] = {(minutes, name): [] for minutes in (0.0, slack / 2, slack, 2 * slack)
                                                              for name in estimates}
    for seed in seeds:
        trace = make_trace(n_tasks, seed, arrival_minutes)
        bound = lower_bound(trace, n_gpus)
        for (minutes, name), runs in found.items():
            run = simulate(trace, n_gpus, Strategy.EASY_BACKFILL, False, overestimate=estimates[name], seed=seed, slack=minutes)
            runs.append(run | {"ratio": run["makespan"] / bound})
    table = Table(title=f"easy-backfill over seeds {seeds[0]}-{seeds[-1]}, a task every {arrival_minutes:g} min: makespan vs "
                        "lower bound, and waits")
    for column in ["slack", "estimates", "mean", "min", "max", "seeds ≤ 1.05×", "mean wait (h)", "high-priority wait (h)",
                   f"{n_gpus}-GPU task wait (h)"]:
        table.add_column(column, justify="right")
    for (minutes, name), runs in found.items():
        ratios = [r["ratio"] for r in runs]
        table.add_row(f"{minutes:g} min" if minutes else "none (pure EASY)", name, f"{statistics.mean(ratios):.3f}×",
                      f"{min(ratios):.3f}×", f"{max(ratios):.3f}×", f"{sum(r <= 1.05 for r in ratios)}/{len(ratios)}",
                      f"{statistics.mean(r['mean_wait'] for r in runs) / 60:.1f}",
                      f"{statistics.mean(r['high_wait'] for r in runs) / 60:.2f}",
                      f"{statistics.mean(r['all_gpus_wait'] for r in runs) / 60:.1f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seeds", help="also easy-backfill over a range of seeds, e.g. 1-80")
    parser.add_argument("--arrival-minutes", type=float, default=3.0, help="mean time between submissions")
    parser.add_argument("--slack-minutes", type=float, default=Settings().backfill_slack_s / 60,
                        help="easy-backfill's slack (default: Corral's, CORRAL_BACKFILL_SLACK_S)")
    args = parser.parse_args()
    trace = make_trace(args.tasks, args.seed, args.arrival_minutes)
    bound = lower_bound(trace, args.gpus)
    easy = f"easy-backfill, slack {args.slack_minutes:g} min"
    rows = {
        "spec 02 original (one task per machine, FIFO)": simulate(trace, args.gpus, Strategy.STRICT_FIFO, whole_machine=True),
        "strict-fifo": simulate(trace, args.gpus, Strategy.STRICT_FIFO, whole_machine=False),
        "best-effort-fifo": simulate(trace, args.gpus, Strategy.BEST_EFFORT_FIFO, whole_machine=False),
        "easy-backfill, pure EASY (exact estimates)": simulate(trace, args.gpus, Strategy.EASY_BACKFILL, whole_machine=False),
        "easy-backfill, pure EASY (timeouts 1-3× the run time)": simulate(trace, args.gpus, Strategy.EASY_BACKFILL, whole_machine=False,
                                                                          overestimate=3.0, seed=args.seed),
        f"{easy} (exact estimates)": simulate(trace, args.gpus, Strategy.EASY_BACKFILL, whole_machine=False,
                                              slack=args.slack_minutes),
        f"{easy} (timeouts 1-3× the run time)": simulate(trace, args.gpus, Strategy.EASY_BACKFILL, whole_machine=False,
                                                         overestimate=3.0, seed=args.seed, slack=args.slack_minutes),
        f"{easy} (every timeout the 6 h default)": simulate(trace, args.gpus, Strategy.EASY_BACKFILL, whole_machine=False,
                                                            timeout=360.0, slack=args.slack_minutes),
    }
    console = Console(width=160)
    table = Table(title=f"{args.tasks} finetune tasks on {args.gpus} simulated 80 GB GPUs, one every {args.arrival_minutes:g} min "
                        f"(seed {args.seed})")
    for column in ["policy", "makespan (h)", "vs lower bound", "GPU utilisation", "mean wait (h)", "high-priority wait (h)"]:
        table.add_column(column, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['makespan'] / 60:.1f}", f"{r['makespan'] / bound:.3f}×", f"{r['utilisation']:.1%}",
                      f"{r['mean_wait'] / 60:.1f}", f"{r['high_wait'] / 60:.2f}")
    table.add_row("lower bound", f"{bound / 60:.1f}", "1.000×", "", "", "")
    console.print(table)
    timing = Table(title=f"Scheduling decision time, {args.gpus} GPUs free, median of 5")
    for column in ["queued tasks", "strict-fifo (ms)", "best-effort-fifo (ms)", "easy-backfill (ms)"]:
        timing.add_column(column, justify="right")
    for n in (100, 1_000, 10_000):
        timing.add_row(f"{n:,}", *(f"{decision_time(n, args.gpus, s):.1f}" for s in
                                   (Strategy.STRICT_FIFO, Strategy.BEST_EFFORT_FIFO, Strategy.EASY_BACKFILL)))
    console.print(timing)
    if args.seeds:
        first, _, last = args.seeds.partition("-")
        seed_sweep(console, list(range(int(first), int(last or first) + 1)), args.tasks, args.gpus, args.slack_minutes,
                   args.arrival_minutes)


if __name__ == "__main__":
    main()
