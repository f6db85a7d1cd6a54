"""Finetune datasets: JSONL, one example per line, as chat `messages` or `instruction`/`input`/`output`.

Validated completely before a task is queued, so a bad file is refused with the line to fix instead
of failing hours later in the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.domain.errors import InvalidInput

ROLES = {"system", "user", "assistant"}


def to_messages(record: Any, line: int) -> list[dict[str, str]]:
    """One example as chat messages, or InvalidInput naming the line and what is wrong."""
    where = f"dataset line {line}"
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidInput(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise InvalidInput(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}")
        if messages[-1]["role"] != "assistant":
            raise InvalidInput(f"{where}: the last message must be the assistant's (what the model learns to say)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "output" in record:
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise InvalidInput(f"{where}: '{key}' must be a string")
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise InvalidInput(f"{where}: needs 'messages', or 'instruction' and 'output' (with optional 'input')")


def load_dataset(path: Path) -> list[list[dict[str, str]]]:
    """Every example as messages; InvalidInput for a missing, empty or malformed file."""
    if not path.is_file():
        raise InvalidInput(f"datasetPath '{path}' is not a file")
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"dataset line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            examples.append(to_messages(record, number))
    if not examples:
        raise InvalidInput(f"datasetPath '{path}' has no examples")
    return examples
