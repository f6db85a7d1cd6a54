"""Finetune datasets: JSONL (one example per line) or one JSON array of examples, in any of the formats
`corral.finetune.formats` recognises (OpenAI messages, ShareGPT, Alpaca, prompt/completion, plain text),
detected per example.

Validated completely before a task is queued, so a bad file is refused with the line to fix instead
of failing hours later in the trainer. In a JSON array the line is where the bad example starts.
The SHA-256 of the very bytes validated comes with the examples: the task manager snapshots the file
into the task's directory at submit and checks the copy against it, so what trains (and what a resume
continues) is what was validated and counted, whatever happens to the original afterwards.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.domain.errors import InvalidInput
from corral.finetune.formats import Example, parse

SNIFF_BYTES = 8192  # a NUL byte in the first ones: a binary file, not JSONL text
BINARY = ("is a binary file, not JSONL text: give a .jsonl file with one JSON example per line (or a .json file holding "
          "one array of examples)")


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    formats: dict[str, int]  # format → examples in it
    sha256: str = ""  # of the bytes read (`file_sha256` of a copy must match)

    @property
    def format(self) -> str:
        """The format's name, or `mixed (messages 30, alpaca 20)`."""
        if len(self.formats) == 1:
            return next(iter(self.formats))
        return "mixed (" + ", ".join(f"{name} {count}" for name, count in self.formats.items()) + ")"

    @property
    def chat(self) -> bool:
        """Whether any example goes through the tokenizer's chat template."""
        return any(example.chat for example in self.examples)


def load_dataset(path: Path) -> list[Example]:
    """Every example, normalised; InvalidInput for a missing, unreadable, binary, empty or malformed file.
    A message names the line and what is wrong with it, never the file's content."""
    return read_dataset(path).examples


def read_dataset(path: Path) -> Dataset:
    """The examples and the formats found (see `load_dataset`)."""
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a NUL byte in the path, a name too long
        is_file = False
    if not is_file:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            if b"\0" in head:
                raise InvalidInput(f"datasetPath '{_short(str(path))}' {BINARY}")
            f.seek(0)
            digest = hashlib.sha256()
            if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                data = f.read()
                digest.update(data)
                records: Any = _array(data)
            else:
                records = _lines(_hashed(f, digest))
            examples = [parse(record, number) for number, record in records]
    except OSError as exc:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not examples:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' has no examples")
    return Dataset(examples, dict(Counter(example.format for example in examples)), digest.hexdigest())


def _hashed(lines: Any, digest: Any) -> Any:
    """The file's lines, each added to `digest` as it is read."""
    for raw in lines:
        digest.update(raw)
        yield raw


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _lines(lines: Any) -> Any:
    """(line number, record) of a JSONL file, lazily: the first bad line stops the reading."""
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"dataset line {number}: not UTF-8 text (is it a binary file?); "
                               "save the dataset as UTF-8 JSONL") from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        yield number, _decode(text, number)


def _decode(text: str, number: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"dataset line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise InvalidInput(f"dataset line {number}: nested too deeply") from None


def _array(data: bytes) -> list[tuple[int, Any]]:
    """(line where it starts, record) of each element of a JSON array file."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(f"dataset line {line}: not UTF-8 text (is it a binary file?); save the dataset as UTF-8 JSON") from None
    decoder = json.JSONDecoder()
    records = []
    at = _skip(text, 0)
    at = _skip(text, at + 1)  # past '['
    if at < len(text) and text[at] == "]":
        return []
    while True:
        line = text.count("\n", 0, at) + 1
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            bad = text.count("\n", 0, exc.pos) + 1
            column = exc.pos - (text.rfind("\n", 0, exc.pos) + 1) + 1
            raise InvalidInput(f"dataset line {bad}: not valid JSON ({exc.msg} at column {column})") from None
        except RecursionError:
            raise InvalidInput(f"dataset line {line}: nested too deeply") from None
        records.append((line, record))
        at = _skip(text, at)
        if at < len(text) and text[at] == ",":
            at = _skip(text, at + 1)
            continue
        if at < len(text) and text[at] == "]" and not text[_skip(text, at + 1):].strip():
            return records
        bad = text.count("\n", 0, at) + 1
        raise InvalidInput(f"dataset line {bad}: not valid JSON (expected ',' or ']' after an example of the array)")


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _short(value: str, limit: int = 300) -> str:
    value = value.replace("\0", "\\0")
    return value if len(value) <= limit else value[:limit] + "…"
