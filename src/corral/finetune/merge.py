"""Merge a finished LoRA adapter into its base model, for engines that serve plain weights.

    python -m corral.finetune.merge TASK_DIR

Writes TASK_DIR/merged (model + tokenizer). A separate process: merging loads the whole model. The weights are
written to TASK_DIR/merged.partial and renamed when complete, so `merged` is never half-written. The tokenizer is
the one saved with the adapter (it carries the chat template the model was trained with, a built-in one when
`chatTemplate` chose it), else the base model's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def merge(task_dir: Path) -> Path:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    config = json.loads((task_dir / "task.json").read_text())
    adapter = task_dir / "output"
    target = task_dir / "merged"
    partial = task_dir / "merged.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a merge killed half-way
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    model.merge_and_unload().save_pretrained(partial)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else config["baseModel"]
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m corral.finetune.merge TASK_DIR")
    print(merge(Path(sys.argv[1])))
