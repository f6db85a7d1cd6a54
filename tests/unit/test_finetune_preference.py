"""Preference pairs for dpo and orpo (`corral.finetune.preference`): flat strings with a prompt, OpenAI and ShareGPT
message lists, whole conversations with an implicit prompt; a malformed pair refused with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.domain.errors import InvalidInput
from corral.domain.hyperparameters import validate
from corral.finetune.dataset import read_dataset
from corral.finetune.preference import PREFERENCE_MESSAGES, PREFERENCE_TEXT, parse_preference

USER, YES, NO = {"role": "user", "content": "is the sky blue?"}, {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}


def test_the_shapes_of_a_pair() -> None:
    flat = parse_preference({"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}, 1)
    assert (flat.format, flat.chat, flat.for_trl()) == (PREFERENCE_TEXT, False, {"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"})
    messages = parse_preference({"prompt": [USER], "chosen": [YES], "rejected": [NO]}, 1)
    assert (messages.format, messages.for_trl()) == (PREFERENCE_MESSAGES, {"prompt": [USER], "chosen": [YES], "rejected": [NO]})
    sharegpt = parse_preference({"conversations": [{"from": "human", "value": "is the sky blue?"}], "system": "be brief",
                                 "chosen": {"from": "gpt", "value": "yes"}, "rejected": {"from": "gpt", "value": "no"}}, 1)
    assert sharegpt.for_trl() == {"prompt": [{"role": "system", "content": "be brief"}, USER], "chosen": [YES], "rejected": [NO]}
    implicit = parse_preference({"chosen": [USER, YES], "rejected": [USER, NO]}, 1)
    assert implicit.for_trl() == messages.for_trl()
    text = messages.side("chosen")  # the preview's view: the prompt untrained, the chosen answer trained
    assert text.messages == [USER, YES] and text.trained == [False, True]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "q", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "flat 'chosen' and 'rejected' strings need a 'prompt' string"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' must be a non-empty string"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same answer"),
    ({"chosen": [USER, YES], "rejected": [{"role": "user", "content": "other"}, NO]}, "share every turn but their last"),
    ({"prompt": [USER], "chosen": [YES, YES], "rejected": [NO]}, "'chosen' must be one assistant answer"),
    ({"prompt": [YES], "chosen": [YES], "rejected": [NO]}, "the prompt's last turn must be the user's"),
    ({"prompt": [USER], "chosen": [{"from": "robot", "value": "x"}], "rejected": [NO]}, r"chosen\[0\]: the role must be one of"),
    ({"prompt": [USER], "chosen": [], "rejected": [NO]}, "'chosen' must be a string or a non-empty list of messages"),
])
def test_a_malformed_pair_is_refused_with_its_line(record: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=f"dataset line 7: .*{message}"):
        parse_preference(record, 7)


def test_a_preference_file_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(InvalidInput, match="dataset line 2: needs 'chosen' and 'rejected'"):
        read_dataset(path, parse_preference)


def test_preference_defaults() -> None:
    assert validate({}, "dpo")["learningRate"] == 5e-6 and validate({}, "orpo")["prefBeta"] == 0.1
    with pytest.raises(InvalidInput, match="hyperparameter prefBeta must be a positive number at most 100"):
        validate({"prefBeta": 0}, "dpo")
