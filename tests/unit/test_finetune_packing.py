"""Packing's pure parts (`corral.finetune.packing`): rows never over maxSeqLen, every example once, padding counted."""

from __future__ import annotations

import random

import pytest

from corral.domain.errors import InvalidInput
from corral.domain.hyperparameters import validate
from corral.finetune.packing import estimate, pack, packed_rows, padding_tokens


def test_rows_hold_every_example_once_within_the_capacity() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    rows = pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 128) * 1.1  # best fit decreasing: within 10% of the fewest possible rows
    assert pack(lengths, 128) == rows  # deterministic: a resume finds the same rows


def test_a_long_example_gets_a_row_of_its_own_and_nothing_is_lost() -> None:
    assert pack([200, 10, 10], 128) == [[0], [1, 2]]
    assert pack([], 128) == []


def test_padding_is_counted_per_batch() -> None:
    assert padding_tokens([10, 2, 5, 5], 2) == 8 + 0
    assert padding_tokens([10, 2, 5], 4) == 8 + 5
    shown = estimate([30, 1, 25, 2, 3, 1, 2, 4], capacity=64, batch_size=4, seed=42)
    assert (shown.rows, shown.packed_rows) == (8, 2) and shown.packed_padding < shown.padding


def test_packed_rows_restart_positions_and_mask_each_first_token() -> None:
    rows = packed_rows([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}], 8)
    assert rows == [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}]


def test_packing_is_a_switch() -> None:
    assert validate({})["packing"] is False and validate({"packing": True})["packing"] is True
    with pytest.raises(InvalidInput, match="hyperparameter packing must be true or false"):
        validate({"packing": 1})


def test_early_stopping_needs_an_eval_split() -> None:
    assert validate({"earlyStoppingPatience": 3, "valSize": 0.1})["earlyStoppingPatience"] == 3
    with pytest.raises(InvalidInput, match="earlyStoppingPatience needs an eval split to watch: set valSize"):
        validate({"earlyStoppingPatience": 3})
    with pytest.raises(InvalidInput, match=r"hyperparameter reportTo must be one of auto \(tensorboard when it is installed"):
        validate({"reportTo": "wandb"})


def test_pure_bf16_is_for_a_full_finetune() -> None:
    assert validate({"pureBf16": True}, "full")["pureBf16"] is True
    with pytest.raises(InvalidInput, match="hyperparameter pureBf16 is for method full .a lora task keeps the base model in 16-bit"):
        validate({"pureBf16": True}, "lora")
