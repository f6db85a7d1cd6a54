"""Merge a finished LoRA adapter into its base model, for engines that serve plain weights.

    python -m corral.finetune.merge TASK_DIR

Writes TASK_DIR/merged (model + tokenizer). A separate process: merging loads the whole model. The weights are
written to TASK_DIR/merged.partial and renamed when complete, so `merged` is never half-written. One merge per task
directory at a time, whoever started it: each holds TASK_DIR/merge.lock (flock) while it works, and one that waited
finds the other's result and stops. Started by Corral (CORRAL_MERGE_PARENT), the merge dies with it (Linux's parent-death
signal): a control plane killed mid-merge leaves no orphan merging on, and the next export starts afresh. The tokenizer is
the one saved with the adapter (it carries the chat template the model was trained with, a built-in one when
`chatTemplate` chose it, and that template's end-of-turn token as its EOS), else the base model's; the adapter
directory's generation_config.json (written by the trainer when it replaced the EOS) replaces the base model's, so
the merged model stops where the trained one does.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

PARENT_ENV = "CORRAL_MERGE_PARENT"  # the pid of the Corral that started this merge: the merge dies with it


def merge(task_dir: Path) -> Path:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, GenerationConfig

    config = json.loads((task_dir / "task.json").read_text())
    adapter = task_dir / "output"
    target = task_dir / "merged"
    partial = task_dir / "merged.partial"
    lock = open(task_dir / "merge.lock", "a")  # noqa: SIM115 (held until the process exits)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another merge of this directory (an orphan of a killed Corral, say) finishes first
    if (target / "config.json").is_file():
        return target  # it merged while this one waited
    shutil.rmtree(partial, ignore_errors=True)  # a merge killed half-way
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload()
    if (adapter / "generation_config.json").is_file():  # the trainer's: EOS = the chat template's end of turn
        model.generation_config = GenerationConfig.from_pretrained(adapter)
    model.save_pretrained(partial)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else config["baseModel"]
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the Corral that started it dies, however it dies."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # it died before the line above
        raise SystemExit("the Corral that started this merge is gone")


if __name__ == "__main__":
    die_with_parent()
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m corral.finetune.merge TASK_DIR")
    print(merge(Path(sys.argv[1])))
