"""Packing: several tokenized examples in one fixed-length row, so a batch is not mostly padding (the `packing`
hyperparameter; LLaMA-Factory's `packing` / `neat_packing`, TRL's `packing=True` with `padding_free`).

Rows are filled best-fit decreasing (each example, longest first, into the fullest row it still fits, at most
`maxSeqLen` tokens a row): deterministic, so a resume finds the same rows, and close to full with few rows. An
example is never split across rows.

Cross-example attention is masked: each example's `position_ids` restart at 0 inside its row and the row has no
`attention_mask`, which is how transformers (≥ 4.57, Corral's floor) recognises packed sequences
(`masking_utils.find_packed_sequence_indices`): eager and sdpa attention get a block-diagonal causal mask, and
flash-attention runs each example as its own sequence (varlen). So an example attends to itself only, with the
positions it would have alone: its loss is the one it has unpacked (tested on the tiny model). A model whose code
does not build its mask with `create_causal_mask` (some remote-code models) would attend across examples; Corral's
supported architectures all do. The first token of each packed example is not a target (the previous example's
last token does not learn to predict it), as unpacked, where the first token is never a target.

The padding that remains (each row of a batch filled to the longest row) is counted, packed or not, so the preview
and the progress say what packing saved. Pure except `collate`, which builds torch tensors (torch imported there:
the preview and the control plane count without it).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # the label that no loss covers (`corral.finetune.examples.IGNORE`)
EVAL_MARK = "corral_eval"  # a row of the eval split: its padding is not counted with the training's


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most `capacity` (best fit, longest first; ties in
    index order). An example longer than `capacity` gets a row of its own (the encoder never makes one)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row number), sorted: the tightest row that fits is a bisect away
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
        else:
            rows.append([i])
            space, row = capacity, len(rows) - 1
        bisect.insort(free, (space - lengths[i], row))
    return [sorted(row) for row in rows]


def padding_tokens(row_lengths: Sequence[int], batch_size: int, seed: int | None = None) -> int:
    """Padding tokens of one epoch in batches of `batch_size` rows, each row filled to its batch's longest: in the
    rows' order, or in one shuffled order with `seed` (what the Trainer's random sampler does; an estimate, since
    its order is its own)."""
    lengths = list(row_lengths)
    if seed is not None:
        random.Random(seed).shuffle(lengths)
    return sum(max(batch) * len(batch) - sum(batch)
               for batch in (lengths[at:at + batch_size] for at in range(0, len(lengths), max(1, batch_size))))


@dataclass(frozen=True)
class PackingEstimate:
    """What packing would change, for the preview: rows and padding tokens per epoch, unpacked and packed."""

    rows: int
    packed_rows: int
    padding: int
    packed_padding: int

    def as_json(self) -> dict[str, int]:
        return {"rows": self.rows, "packedRows": self.packed_rows, "padTokens": self.padding, "packedPadTokens": self.packed_padding}


def estimate(lengths: Sequence[int], capacity: int, batch_size: int, seed: int) -> PackingEstimate:
    rows = pack(lengths, capacity)
    return PackingEstimate(rows=len(lengths), packed_rows=len(rows), padding=padding_tokens(lengths, batch_size, seed),
                           packed_padding=padding_tokens([sum(lengths[i] for i in row) for row in rows], batch_size, seed))


def packed_rows(examples: Sequence[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """The examples (`input_ids`, `labels`) packed into rows with `position_ids` restarting at each example."""
    rows = []
    for row in pack([len(e["input_ids"]) for e in examples], capacity):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in row:
            example = examples[i]
            ids += example["input_ids"]
            labels += [IGNORE] + example["labels"][1:]
            positions += range(len(example["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


@dataclass
class Collator:
    """Batches of rows as tensors, each row padded to the batch's longest; counts the training's padding tokens and
    all its tokens (rows marked `EVAL_MARK` are not counted). Packed rows carry `position_ids` and get no
    `attention_mask` (the packed-sequence mask, see the module doc); their padding restarts the positions at 0, a
    sequence of its own that no example attends to and no loss covers."""

    pad_id: int
    packed: bool
    pad_tokens: int = 0
    tokens: int = 0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if not any(b.get(EVAL_MARK) for b in batch):
            self.pad_tokens += sum(width - len(b["input_ids"]) for b in batch)
            self.tokens += width * len(batch)
        gaps = [width - len(b["input_ids"]) for b in batch]
        out = {"input_ids": torch.tensor([b["input_ids"] + [self.pad_id] * gap for b, gap in zip(batch, gaps, strict=True)]),
               "labels": torch.tensor([b["labels"] + [IGNORE] * gap for b, gap in zip(batch, gaps, strict=True)])}
        if self.packed:
            out["position_ids"] = torch.tensor([b["position_ids"] + list(range(gap)) for b, gap in zip(batch, gaps, strict=True)])
        else:
            out["attention_mask"] = torch.tensor([[1] * len(b["input_ids"]) + [0] * gap for b, gap in zip(batch, gaps, strict=True)])
        return out
