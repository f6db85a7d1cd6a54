"""Which GPUs a new replica gets: whole devices not held by another replica."""

from __future__ import annotations

from collections.abc import Iterable

from corral.domain.errors import Conflict


def pick_gpus(all_ids: Iterable[int], held_ids: Iterable[int], wanted: int, who: str) -> tuple[int, ...]:
    """The `wanted` lowest free device indices, or a Conflict that says how many are free."""
    if wanted == 0:
        return ()
    all_list = sorted(set(all_ids))
    free = [i for i in all_list if i not in set(held_ids)]
    if len(free) < wanted:
        raise Conflict(
            f"{who} needs {wanted} GPU(s) but only {len(free)} of {len(all_list)} detected GPU(s) are free; "
            "set gpusPerReplica to 0 for a CPU engine (simulator, transformers) or free GPUs first"
        )
    return tuple(free[:wanted])
