"""The trainer process: one finetune task, LoRA / QLoRA / full, with transformers + peft.

    python -m corral.finetune.trainer TASK_DIR

Reads TASK_DIR/task.json; appends progress as JSON lines to TASK_DIR/progress.jsonl (step, total
steps, loss, learning rate, epoch, ETA), which the task manager follows; keeps checkpoints in
TASK_DIR/checkpoints and resumes from the newest one when started again; writes the result to
TASK_DIR/output (the adapter for LoRA/QLoRA, the model for full). A separate process so a crash or a
kill never touches the control plane, and so it can outlive a control-plane restart.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class ProgressFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **event: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")


def train(task_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from corral.finetune.dataset import load_dataset
    from corral.finetune.hyperparameters import for_trainer

    config = json.loads((task_dir / "task.json").read_text())
    hp = for_trainer(config["hyperparameters"])  # integers as int (batch size, ranks, lengths, steps, seed)
    progress = ProgressFile(task_dir / "progress.jsonl")
    checkpoints = task_dir / "checkpoints"
    resume = checkpoints.exists() and any(checkpoints.glob("checkpoint-*"))
    progress.write(event="preparing", resume=resume)

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(config["baseModel"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if config["method"] == "qlora":
        if not cuda:
            raise SystemExit("qlora needs a CUDA GPU (bitsandbytes 4-bit); use method 'lora' on CPU")
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(config["baseModel"], **model_kwargs)
    if config["method"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if config["method"] == "qlora":
            model = prepare_model_for_kbit_training(model)
        model = get_peft_model(model, LoraConfig(
            r=hp["loraRank"], lora_alpha=hp["loraAlpha"], lora_dropout=hp["loraDropout"], target_modules="all-linear",
            task_type="CAUSAL_LM",
        ))

    examples = []
    for messages in load_dataset(Path(config["datasetPath"])):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, truncation=True, max_length=hp["maxSeqLen"])["input_ids"]
        examples.append({"input_ids": ids, "labels": list(ids)})

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch]),
            "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]),
        }

    class Report(TrainerCallback):
        started = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.started = time.monotonic()
            self.first_step = state.global_step
            progress.write(event="training", step=state.global_step, totalSteps=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            if not logs or "loss" not in logs:
                return
            done = state.global_step - self.first_step
            rate = (time.monotonic() - self.started) / done if done else None
            eta = rate * (state.max_steps - state.global_step) if rate else None
            progress.write(event="step", step=state.global_step, totalSteps=state.max_steps, loss=logs["loss"],
                           learningRate=logs.get("learning_rate"), epoch=round(state.epoch or 0, 4), eta=eta)

    args = TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=hp["epochs"], per_device_train_batch_size=hp["batchSize"],
        gradient_accumulation_steps=hp["gradientAccumulation"], learning_rate=hp["learningRate"],
        logging_steps=1, save_strategy="steps", save_steps=hp["saveSteps"], save_total_limit=2, report_to=[],
        use_cpu=not cuda, bf16=cuda, seed=hp["seed"], disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Report()])
    trainer.train(resume_from_checkpoint=bool(resume))
    output = task_dir / "output"
    trainer.model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    progress.write(event="completed", output=str(output), step=trainer.state.global_step, totalSteps=trainer.state.max_steps)


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--log-to"):
        raise SystemExit("usage: python -m corral.finetune.trainer TASK_DIR [--log-to FILE]")
    if len(args) == 3:  # in a Job: the output goes to the task's log on the shared volume
        log = os.open(args[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    train(Path(args[0]))


if __name__ == "__main__":
    main()
