"""Datasets beyond one JSONL file (issue 27 item 5): Parquet, Arrow and Hugging Face `datasets` directories read as
records, and several sources mixed with ratios; the request's `datasets` validated before anything is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.domain.errors import InvalidInput
from corral.domain.finetune_request import check_dataset_sources
from corral.finetune.dataset import read_dataset, read_sources

datasets = pytest.importorskip("datasets")

ROWS = [{"instruction": f"double {i}", "input": "", "output": str(2 * i)} for i in range(10)]
CHATS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]} for i in range(4)]


def test_parquet_arrow_and_a_datasets_directory_read_as_records(tmp_path: Path) -> None:
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHATS), "test": table}).save_to_disk(str(tmp_path / "splits"))
    import pyarrow.feather

    pyarrow.feather.write_feather(table.data.table, tmp_path / "rows.arrow")  # the Arrow IPC file format
    for name in ("rows.parquet", "saved", "rows.arrow"):
        read = read_dataset(tmp_path / name)
        assert (read.format, len(read.examples)) == ("alpaca", 10), name
        assert read.snapshot is not None and [json.loads(line) for line in read.snapshot.decode().splitlines()] == ROWS
    chats = read_dataset(tmp_path / "splits")  # a DatasetDict: its train split
    assert (chats.format, len(chats.examples)) == ("messages", 4)
    assert read_dataset(tmp_path / "rows.parquet").sha256 == read_dataset(tmp_path / "saved").sha256  # of the same records


def test_a_bad_row_is_named_and_a_bad_table_refused(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"text": "ok"}, {"text": "fine"}, {"text": ""}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InvalidInput, match="dataset row 3: 'text' must be a non-empty string"):
        read_dataset(tmp_path / "bad.parquet")
    (tmp_path / "fake.parquet").write_text('{"text": "not parquet"}\n')
    with pytest.raises(InvalidInput, match="cannot be read as an Arrow file"):
        read_dataset(tmp_path / "fake.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="is not a file .nor a directory written by Hugging Face datasets' save_to_disk"):
        read_dataset(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{}")
    with pytest.raises(InvalidInput, match="cannot be read as a Hugging Face datasets directory"):
        read_dataset(tmp_path / "broken")


def test_sources_mix_by_ratio_with_counts_per_source(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.Dataset.from_list(CHATS).to_parquet(str(tmp_path / "b.parquet"))
    sources = [(tmp_path / "a.jsonl", 0.5), (tmp_path / "b.parquet", 1.0)]
    mixed = read_sources(sources, seed=42, mixed=True)
    assert [(s["examples"], s["taken"]) for s in mixed.sources] == [(10, 5), (4, 4)]
    assert len(mixed.examples) == 9 and mixed.formats == {"alpaca": 5, "messages": 4}
    records = [json.loads(line) for line in mixed.snapshot.decode().splitlines()]
    assert records[5:] == CHATS and all(r in ROWS for r in records[:5])
    assert read_sources(sources, seed=42, mixed=True).snapshot == mixed.snapshot  # the same seed takes the same examples
    assert read_sources(sources, seed=7, mixed=True).snapshot != mixed.snapshot
    assert read_sources([(tmp_path / "a.jsonl", 0.01)], seed=1, mixed=True).sources[0]["taken"] == 1  # never none
    with pytest.raises(InvalidInput, match=r"datasets\[1\]: '.*missing.jsonl' is not a file"):
        read_sources([(tmp_path / "a.jsonl", 1.0), (tmp_path / "missing.jsonl", 1.0)], seed=1, mixed=True)


@pytest.mark.parametrize(("path", "entries", "message"), [
    (None, [], "datasets must be a list of 1 to 16"),
    (None, [{"path": f"/d/{i}.jsonl"} for i in range(17)], "datasets must be a list of 1 to 16 {path, ratio} entries, got 17"),
    (None, [{"path": "/d/a.jsonl", "ratio": 0}], r"datasets\[0\].ratio must be a number above 0 and at most 1"),
    (None, [{"path": "/d/a.jsonl", "ratio": 1.5}], r"datasets\[0\].ratio must be"),
    (None, [{"path": "/d/a.jsonl", "ratio": float("nan")}], r"datasets\[0\].ratio must be .* got NaN"),
    (None, [{"path": "/d/a.jsonl", "ratio": True}], r"datasets\[0\].ratio must be"),
    (None, [{"path": "/d/a.jsonl"}, {"path": "/d/a.jsonl"}], r"datasets\[1\].path '/d/a.jsonl' is named twice"),
    (None, [{"path": "/d/a.jsonl", "weight": 1}], r"datasets\[0\] must be \{path, ratio\}"),
    (None, [{"ratio": 0.5}], r"datasets\[0\].path is required"),
    ("/d/a.jsonl", [{"path": "/d/b.jsonl"}], "give datasetPath or datasets, not both"),
    (None, None, "datasetPath is required"),
])
def test_the_sources_of_a_request_are_checked(path: str | None, entries: list | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_dataset_sources(path, entries)


def test_sources_accepted() -> None:
    assert check_dataset_sources("/d/a.jsonl", None) == [("/d/a.jsonl", 1.0)]
    assert check_dataset_sources(None, [{"path": "/d/a.jsonl", "ratio": 0.25}, {"path": "/d/b"}]) == [("/d/a.jsonl", 0.25), ("/d/b", 1.0)]


def test_the_forms_mix_box_becomes_datasets() -> None:
    from corral.ui.finetune import mix_entries

    assert mix_entries("/d/a.jsonl", " \n") is None  # empty: the dataset field alone, as datasetPath
    assert mix_entries("/d/a.jsonl", "/d/b.parquet 0.25\n/d/my data\n") == [
        {"path": "/d/a.jsonl", "ratio": 1.0}, {"path": "/d/b.parquet", "ratio": 0.25}, {"path": "/d/my data"}]
    assert mix_entries("", "/d/b 2") == [{"path": "/d/b", "ratio": 2.0}]  # judged by the manager's check: ratio at most 1
    assert check_dataset_sources(None, mix_entries("/d/a.jsonl", "/d/b.parquet 0.25")) == [("/d/a.jsonl", 1.0), ("/d/b.parquet", 0.25)]
