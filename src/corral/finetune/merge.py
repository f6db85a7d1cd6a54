"""Merge a finished LoRA adapter into its base model, for engines that serve plain weights.

    python -m corral.finetune.merge TASK_DIR

Writes TASK_DIR/merged (model + tokenizer). A separate process: merging loads the whole model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(task_dir: Path) -> Path:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    config = json.loads((task_dir / "task.json").read_text())
    adapter = task_dir / "output"
    target = task_dir / "merged"
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    model.merge_and_unload().save_pretrained(target)
    AutoTokenizer.from_pretrained(config["baseModel"]).save_pretrained(target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m corral.finetune.merge TASK_DIR")
    print(merge(Path(sys.argv[1])))
