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


SNIFF_BYTES = 8192  # a NUL byte in the first ones: a binary file, not JSONL text


def load_dataset(path: Path) -> list[list[dict[str, str]]]:
    """Every example as messages; InvalidInput for a missing, unreadable, binary, empty or malformed file.
    A message names the line and what is wrong with it, never the file's content."""
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a NUL byte in the path, a name too long
        is_file = False
    if not is_file:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' is not a file")
    examples = []
    try:
        with open(path, "rb") as lines:
            if b"\0" in lines.read(SNIFF_BYTES):
                raise InvalidInput(f"datasetPath '{_short(str(path))}' is a binary file, not JSONL text: give a .jsonl file "
                                   "with one JSON example per line")
            lines.seek(0)
            for number, raw in enumerate(lines, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"dataset line {number}: not UTF-8 text (is it a binary file?); "
                                       "save the dataset as UTF-8 JSONL") from None
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"dataset line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                except RecursionError:
                    raise InvalidInput(f"dataset line {number}: nested too deeply") from None
                examples.append(to_messages(record, number))
    except OSError as exc:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not examples:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' has no examples")
    return examples


def _short(value: str, limit: int = 300) -> str:
    value = value.replace("\0", "\\0")
    return value if len(value) <= limit else value[:limit] + "…"
