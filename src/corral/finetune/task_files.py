"""A finetune task's directory (DATA_DIR/finetune/<id>), the contract with its trainer: task.json and dataset.snapshot
(the dataset as validated at submit) in;
progress.jsonl, train.log, checkpoints/ and output/ out; merged/ from an export. Corral's own notes go into
train.log beside the trainer's output, so one log tells the whole story of a task."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from corral.backends.local.process import tail_lines
from corral.domain.errors import InvalidInput
from corral.finetune.dataset import file_sha256
from corral.finetune.progress import ProgressEvent, event_of, parse
from corral.finetune.store import TaskRecord
from corral.finetune.trainer import newest_checkpoint


class TaskFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._offsets: dict[str, int] = {}  # task id → bytes of progress.jsonl already read (`new_progress`)

    def dir(self, task_id: str) -> Path:
        return self.root / task_id

    def log(self, task_id: str) -> Path:
        return self.dir(task_id) / "train.log"

    def dataset(self, task_id: str) -> Path:
        """The task's snapshot of its dataset, taken at submit: what its trainer reads, at every start and resume."""
        return self.dir(task_id) / "dataset.snapshot"

    def snapshot_dataset(self, task_id: str, source: Path, sha256: str) -> Path:
        """Copy the validated dataset into the task's directory; InvalidInput when the copy is not the file that was
        validated (it changed in between: submit again)."""
        target = self.dataset(task_id)
        try:
            shutil.copyfile(source, target)
            copied = file_sha256(target)
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise InvalidInput(f"the dataset could not be copied into the task's directory ({exc.strerror or type(exc).__name__}): "
                               "free disk space in Corral's data directory, then submit again") from None
        if copied != sha256:
            target.unlink(missing_ok=True)
            raise InvalidInput(f"the dataset file {str(source)[:300]} changed while it was being submitted (its content is not "
                               "what was validated): submit again once it is written")
        return target

    def write_snapshot(self, task_id: str, data: bytes) -> Path:
        """The records validated, as JSONL, for a dataset that is no one file to copy (a table, a directory, a mix)."""
        target = self.dataset(task_id)
        try:
            target.write_bytes(data)
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise InvalidInput(f"the dataset could not be written into the task's directory ({exc.strerror or type(exc).__name__}): "
                               "free disk space in Corral's data directory, then submit again") from None
        return target

    def merged(self, task_id: str) -> Path:
        """Where an export puts the adapter merged into the base model."""
        return self.dir(task_id) / "merged"

    def note(self, task_id: str, line: str) -> None:
        """A line of Corral's in the task's log."""
        path = self.log(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"[corral {time.strftime('%H:%M:%S')}] {line}\n")

    def last_log_line(self, task_id: str) -> str:
        return tail_lines(self.log(task_id), 1).strip()

    def checkpoint(self, task_id: str) -> str | None:
        """The newest complete checkpoint, the one the trainer resumes from (`trainer.newest_checkpoint`)."""
        return newest_checkpoint(self.dir(task_id) / "checkpoints")

    def write_spec(self, task: TaskRecord) -> None:
        """What the trainer reads: task.json."""
        snapshot = self.dataset(task.id)  # a task queued by an older Corral has none: its original file, then
        (self.dir(task.id) / "task.json").write_text(json.dumps({
            "baseModel": task.base_model, "datasetPath": str(snapshot) if snapshot.is_file() else task.dataset_path,
            "method": task.method,
            "hyperparameters": task.hyperparameters,
        }))

    # progress ----------------------------------------------------------------------------------
    def _progress_path(self, task_id: str) -> Path:
        return self.dir(task_id) / "progress.jsonl"

    def new_progress(self, task_id: str) -> list[dict[str, Any]]:
        """The progress lines written since the last call (a line being written is read next time)."""
        try:
            with open(self._progress_path(task_id), encoding="utf-8") as f:
                f.seek(self._offsets.get(task_id, 0))
                data = f.read()
                complete = data[: data.rfind("\n") + 1]
                self._offsets[task_id] = self._offsets.get(task_id, 0) + len(complete.encode())
        except FileNotFoundError:
            return []
        return [fields for line in complete.splitlines() if (fields := parse(line)) is not None]

    def _all_progress(self, task_id: str) -> list[dict[str, Any]]:
        try:
            lines = self._progress_path(task_id).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [fields for line in lines if (fields := parse(line)) is not None]

    def reported(self, task_id: str, event: ProgressEvent) -> bool:
        """Whether the trainer ever wrote `event` (e.g. `completed`: its result, even if Corral was down then)."""
        return any(event_of(fields) is event for fields in self._all_progress(task_id))

    def last_event(self, task_id: str) -> ProgressEvent | None:
        """The event of the last progress line (e.g. `preempted`, when a trainer exits to give its GPUs)."""
        return event_of(parse(tail_lines(self._progress_path(task_id), 1)))

    def curve(self, task_id: str, key: str = "loss") -> list[tuple[int, float]]:
        """(step, value) of every logged step: `loss` and `learningRate` from the steps, `evalLoss` from the
        evaluations. A step replayed after a resume from a checkpoint counts once (its latest value)."""
        kind = ProgressEvent.EVAL if key == "evalLoss" else ProgressEvent.STEP
        points: dict[int, float] = {}
        for fields in self._all_progress(task_id):
            if event_of(fields) is kind and fields.get(key) is not None:
                points[int(fields["step"])] = float(fields[key])
        return sorted(points.items())
