"""Finetune datasets: JSONL (one example per line) or one JSON array of examples, in any of the formats
`corral.finetune.formats` recognises (OpenAI messages, ShareGPT, Alpaca, prompt/completion, plain text),
detected per example; or the same records as the rows of a Parquet file, an Arrow file, or a directory written by
Hugging Face `datasets`' `save_to_disk` (read with pyarrow and `datasets`, the `train` extra: nothing is cached or
downloaded). Several sources mix with a ratio each (`mix`: the share of a source's examples taken).

Validated completely before a task is queued, so a bad file is refused with the line to fix instead
of failing hours later in the trainer. In a JSON array the line is where the bad example starts.
The SHA-256 of the very bytes validated comes with the examples: the task manager snapshots the file
into the task's directory at submit and checks the copy against it, so what trains (and what a resume
continues) is what was validated and counted, whatever happens to the original afterwards. A table or a mix has
no one file to copy: its snapshot is the records validated, written as JSONL (`Dataset.snapshot`, hashed), which
the trainer reads like any JSONL.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.domain.errors import InvalidInput
from corral.finetune.formats import Example, parse

SNIFF_BYTES = 8192  # a NUL byte in the first ones: a binary file, not JSONL text
BINARY = ("is a binary file, not JSONL text: give a .jsonl file with one JSON example per line (or a .json file holding "
          "one array of examples)")


Parser = Callable[[Any, int], Any]  # one record and its line → an example (formats.parse, preference.parse_preference)
TABLE_SUFFIXES = (".parquet", ".arrow")
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # in a `save_to_disk` directory (a Dataset's, a DatasetDict's)
MAX_SOURCES = 16  # `datasets` entries of a mix


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    formats: dict[str, int]  # format → examples in it
    sha256: str = ""  # of the bytes read (`file_sha256` of a copy must match)
    records: list[Any] = field(default_factory=list, repr=False, compare=False)  # as read, one per example (for a mix)
    snapshot: bytes | None = field(default=None, repr=False, compare=False)  # the JSONL to store when no file is to copy
    sources: list[dict[str, Any]] = field(default_factory=list)  # a mix's: path, ratio, examples, taken

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


def read_dataset(path: Path, parser: Parser = parse) -> Dataset:
    """The examples and the formats found (see `load_dataset`); `parser` reads one record (`preference.parse_preference`
    for dpo and orpo)."""
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError):  # a NUL byte in the path, a name too long
        is_file = is_dir = False
    if is_dir and any((path / name).is_file() for name in SAVED_MARKERS):
        return read_table(path, parser)
    if not is_file:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' is not a file" + (
            " (nor a directory written by Hugging Face datasets' save_to_disk: it has no "
            f"{' or '.join(SAVED_MARKERS)})" if is_dir else ""))
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            if path.suffix.lower() in TABLE_SUFFIXES or head.startswith((b"PAR1", b"ARROW1")):
                return read_table(path, parser)
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
            kept = []
            examples = []
            for number, record in records:
                examples.append(parser(record, number))
                kept.append(record)
    except OSError as exc:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not examples:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' has no examples")
    return Dataset(examples, dict(Counter(example.format for example in examples)), digest.hexdigest(), kept)


def read_table(path: Path, parser: Parser = parse) -> Dataset:
    """A Parquet file, an Arrow file (IPC file or stream) or a `save_to_disk` directory (a DatasetDict's `train`
    split, or its only one): each row a record, validated as a JSONL line would be (`dataset row N`); the snapshot
    is the records as JSONL. Columns a row leaves empty (null) are left out of its record, as a table gives every
    row every column."""
    try:
        rows = _table_rows(path)
    except ImportError:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' is {_article(_table_kind(path))}: reading it needs the `datasets` "
                           "package (pip install 'corral[train]'), or give a JSONL file") from None
    except (OSError, ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InvalidInput(f"datasetPath '{_short(str(path))}' cannot be read as {_article(_table_kind(path))} "
                           f"({_short(str(exc), 200)})") from None
    records = [{k: v for k, v in row.items() if v is not None} for row in rows]
    examples = []
    for number, record in enumerate(records, start=1):
        try:
            examples.append(parser(record, number))
        except InvalidInput as exc:
            raise InvalidInput(exc.message.replace("dataset line", "dataset row", 1)) from None
    if not examples:
        raise InvalidInput(f"datasetPath '{_short(str(path))}' has no examples")
    snapshot = as_jsonl(records)
    return Dataset(examples, dict(Counter(example.format for example in examples)), hashlib.sha256(snapshot).hexdigest(),
                   records, snapshot)


def _table_kind(path: Path) -> str:
    return "Hugging Face datasets directory" if path.is_dir() else ("Parquet file" if _is_parquet(path) else "an Arrow file")


def _article(kind: str) -> str:
    return kind if kind.startswith("an ") else "a " + kind


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _table_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))  # memory-maps the directory's Arrow files; writes nothing
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" not in loaded and len(splits) != 1:
                raise ValueError(f"it has the splits {', '.join(splits)} and none is 'train'")
            loaded = loaded["train" if "train" in loaded else splits[0]]
        return loaded.to_list()
    import pyarrow  # comes with `datasets`

    if _is_parquet(path):
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    import pyarrow.ipc

    try:
        return pyarrow.ipc.open_file(path).read_all().to_pylist()
    except pyarrow.ArrowInvalid:  # not the IPC file format: the stream format (what `datasets` writes)
        with pyarrow.memory_map(str(path)) as source:
            return pyarrow.ipc.open_stream(source).read_all().to_pylist()


def read_sources(sources: list[tuple[Path, float]], seed: int, mixed: bool, parser: Parser = parse) -> Dataset:
    """The dataset of a request: its one `datasetPath` as is, or its `datasets` mixed (`mix`); a source's refusal
    names its entry."""
    if not mixed:
        return read_dataset(sources[0][0], parser)
    read = []
    for i, (path, ratio) in enumerate(sources):
        try:
            read.append((str(path), read_dataset(path, parser), ratio))
        except InvalidInput as exc:
            raise InvalidInput(f"datasets[{i}]: {exc.message.replace('datasetPath ', '', 1)}") from None
    return mix(read, seed)


def as_jsonl(records: list[Any]) -> bytes:
    """Records as JSONL bytes (a value JSON has no type for, a date say, as its text)."""
    return "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records).encode("utf-8")


def mix(sources: list[tuple[str, Dataset, float]], seed: int) -> Dataset:
    """Several datasets as one: of each (path, dataset, ratio), `ratio` (0 to 1) of its examples, at least one, chosen
    with `seed` and kept in their order; the sources one after the other (the Trainer shuffles). The snapshot is
    the records taken, as JSONL."""
    examples: list[Example] = []
    records: list[Any] = []
    counts = []
    for path, dataset, ratio in sources:
        count = len(dataset.examples)
        taken = max(1, min(count, round(count * ratio)))
        chosen = sorted(random.Random(f"{seed}:{path}").sample(range(count), taken)) if taken < count else range(count)
        examples += [dataset.examples[i] for i in chosen]
        records += [dataset.records[i] for i in chosen]
        counts.append({"path": path, "ratio": ratio, "examples": count, "taken": taken, "format": dataset.format})
    snapshot = as_jsonl(records)
    return Dataset(examples, dict(Counter(example.format for example in examples)), hashlib.sha256(snapshot).hexdigest(),
                   records, snapshot, counts)


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
