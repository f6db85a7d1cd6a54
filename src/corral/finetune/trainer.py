"""The trainer process: one finetune task, LoRA / QLoRA / full, with transformers + peft.

    python -m corral.finetune.trainer TASK_DIR
    python -m torch.distributed.run --standalone --nproc_per_node N -m corral.finetune.trainer TASK_DIR   (N GPUs)

Reads TASK_DIR/task.json; appends progress as JSON lines to TASK_DIR/progress.jsonl (the dataset's
counts, then step, total steps, loss, learning rate, epoch, ETA, eval loss; each line's `event` a
`corral.finetune.progress.ProgressEvent`), which the task manager follows; keeps the last `saveTotalLimit`
checkpoints in TASK_DIR/checkpoints and resumes from the newest one when started again (they are removed
once the task completes); writes the result to TASK_DIR/output
(the adapter for LoRA/QLoRA, the model for full). A separate process so a crash or a kill never touches
the control plane, and so it can outlive a control-plane restart.

Preemption: on SIGUSR1 (sent by the task manager when a higher-priority business needs the GPUs) the trainer
finishes the step it is in, saves a checkpoint, writes a `preempted` progress event and exits with
`PREEMPTED_EXIT` (75, EX_TEMPFAIL: "try again"); started again, it resumes from that checkpoint like after any
stop, so nothing is lost but the seconds of the step in flight. A flag, not work in the handler: a signal lands
between two Python instructions anywhere in the Trainer, and only the step boundary is a safe place to save.
Under data parallelism the ranks agree on the flag at every step end (one all-reduce of one number), so they all
save the same step and none waits forever in a collective the others skipped.

How it trains (LLaMA-Factory's defaults, all settable: `corral.domain.hyperparameters`): the loss on
the assistant's turns only (`corral.finetune.examples`), gradient checkpointing, a cosine schedule with
warmup, gradient clipping, bf16 mixed precision where the GPU supports it (Ampere or newer), else fp16,
fp32 on the CPU; a full finetune keeps fp32 master weights (the 16-bit type is for the computation).
The seed is set before the model is built (LoRA's matrices are drawn then), so the same seed gives the same run.
A built-in chat template whose end-of-turn token is not the base model's EOS makes it the EOS before the examples
are encoded, and the result's tokenizer and generation_config.json say so (`templates.replace_eos`): served, the
model stops where it was trained to. task.json names the dataset snapshot taken at submit
(`TaskFiles.snapshot_dataset`), read at every start and resume.

Several GPUs: distributed data parallel, one process per GPU (launched by `torch.distributed.run`, which sets
RANK / LOCAL_RANK / WORLD_SIZE; the Trainer wraps the model in DistributedDataParallel and gives each process its
share of every batch). Each process holds a whole copy of the model, so the queue reserves the single-process
memory on every GPU. Only rank 0 writes progress, the model in each checkpoint and the result (each rank adds
its own RNG state to a checkpoint, which the Trainer needs to resume exactly). Without CUDA the processes talk
through gloo, which is how the launch path is tested on a machine without GPU. QLoRA trains on one GPU.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from corral.finetune.progress import ProgressEvent

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a checkpoint was saved on request; start the trainer again to continue
PREEMPT_SIGNAL = signal.SIGUSR1


class PreemptRequest:
    """Set by the signal handler; read at the next step end (see the module doc)."""

    requested = False

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:  # noqa: ARG003
        cls.requested = True

    @classmethod
    def install(cls) -> None:
        signal.signal(PREEMPT_SIGNAL, cls.handle)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless started by torch.distributed.run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ProgressFile:
    """The task's progress lines. Under data parallelism every rank sees the same steps: only rank 0 writes, so a
    step is never reported once per GPU."""

    def __init__(self, path: Path, rank: int = 0) -> None:
        self.path = path
        self.rank = rank

    def write(self, event: ProgressEvent, **fields: Any) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "event": ProgressEvent(event).value, **fields}) + "\n")


def pick_precision(choice: str, cuda: bool, bf16_supported: bool) -> str:
    """The computation's precision: `auto` is bf16 where the GPU has it, else fp16, and fp32 on the CPU."""
    if not cuda:
        return "fp32"
    if choice == "auto":
        return "bf16" if bf16_supported else "fp16"
    if choice == "bf16" and not bf16_supported:
        raise SystemExit("precision bf16 needs an Ampere or newer GPU (compute capability 8.0); this one has none: "
                         "use precision auto or fp16")
    return choice


def newest_checkpoint(checkpoints: Path) -> str | None:
    """The name of the newest complete `checkpoint-<step>`, the one to resume from, or None. Complete: its
    `trainer_state.json` is there, which the Trainer writes last — a trainer stopped while saving leaves a partial
    newer directory, which is passed over."""
    steps = [(int(p.name.split("-")[-1]), p.name) for p in checkpoints.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def split_for_eval(count: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: `val_size` below 1 is a share of the examples, otherwise a count; at least one
    example always trains."""
    if not val_size or count < 2:
        return list(range(count)), []
    held = round(count * val_size) if val_size < 1 else int(val_size)
    held = max(1, min(held, count - 1))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[held:]), sorted(order[:held])


def preference_trainer(method: str) -> tuple[Any, Any]:
    """(arguments class, trainer class) of TRL for `dpo` or `orpo` (ORPO lives in trl.experimental since TRL 0.2x)."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:  # an older TRL
        from trl import ORPOConfig, ORPOTrainer  # type: ignore[attr-defined,no-redef]
    return ORPOConfig, ORPOTrainer


def reporting(choice: str) -> list[str]:
    """TrainingArguments' `report_to` for the `reportTo` hyperparameter: `auto` is TensorBoard when its package is
    here (the Trainer's TensorBoardCallback writes through torch.utils.tensorboard, which needs it)."""
    if choice == "auto":
        import importlib.util

        choice = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
    return [] if choice == "none" else [choice]


def _arguments(cls: Any, **wanted: Any) -> Any:
    """TrainingArguments across transformers versions: `warmup_ratio` became a float `warmup_steps`,
    `gradient_checkpointing` became `activation_checkpointing`."""
    known = inspect.signature(cls.__init__).parameters
    if "logging_dir" in wanted and "logging_dir" not in known:  # transformers 5: TENSORBOARD_LOGGING_DIR instead
        wanted.pop("logging_dir")
    if "warmup_ratio" in wanted and "warmup_ratio" not in known:
        wanted["warmup_steps"] = wanted.pop("warmup_ratio")
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in wanted and new in known:
            wanted[new] = wanted.pop(old)
    return cls(**wanted)


def train(task_dir: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from corral.domain.finetune_request import ADAPTER_METHODS, PREFERENCE_METHODS
    from corral.domain.hyperparameters import for_trainer
    from corral.finetune import templates
    from corral.finetune.dataset import read_dataset
    from corral.finetune.examples import Encoder
    from corral.finetune.formats import parse
    from corral.finetune.packing import EVAL_MARK, Collator, packed_rows
    from corral.finetune.preference import parse_preference

    config = json.loads((task_dir / "task.json").read_text())
    method = config["method"]
    hp = for_trainer(config["hyperparameters"], method)  # integers as int (batch size, ranks, lengths, steps, seed)
    rank, size = world()
    progress = ProgressFile(task_dir / "progress.jsonl", rank)
    checkpoints = task_dir / "checkpoints"
    resume = newest_checkpoint(checkpoints)
    progress.write(event=ProgressEvent.PREPARING, resume=resume is not None)
    if method == "qlora" and size > 1:
        raise SystemExit("qlora trains on one GPU (bitsandbytes 4-bit weights are not replicated across processes here)")

    cuda = torch.cuda.is_available()
    precision = pick_precision(hp["precision"], cuda, cuda and torch.cuda.is_bf16_supported())
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    pure_bf16 = method == "full" and hp["pureBf16"]
    if pure_bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise SystemExit("pureBf16 needs an Ampere or newer GPU (compute capability 8.0); this one has none: "
                             "set pureBf16 false (fp32 master weights, fp16 computation)")
        precision, compute = "pure bf16", torch.bfloat16
    if rank == 0:
        print(f"[trainer] {method} on {'CUDA' if cuda else 'the CPU'}, {precision} computation"
              + (", fp32 master weights" if method == "full" and not pure_bf16 else "")
              + (": weights, gradients and optimizer states all in bf16" if pure_bf16 else "")
              + (f", data parallel over {size} processes ({'nccl' if cuda else 'gloo'})" if size > 1 else ""), flush=True)
    if size > 1:
        print(f"[trainer] rank {rank} of {size} started (pid {os.getpid()})", flush=True)
    if resume and rank == 0:
        print(f"[trainer] resuming from {resume}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(config["baseModel"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = read_dataset(Path(config["datasetPath"]), parse_preference if method in PREFERENCE_METHODS else parse)
    has_template = templates.apply(tokenizer, hp["chatTemplate"])
    replaced_eos = templates.replace_eos(tokenizer, hp["chatTemplate"])  # before encoding: the answers end with the new EOS
    if replaced_eos is not None and rank == 0:
        print(f"[trainer] chat template {hp['chatTemplate']} ends a turn with {tokenizer.eos_token}, not the base model's EOS "
              f"{replaced_eos}: {tokenizer.eos_token} is the result's EOS (tokenizer and generation_config), so the served "
              "model stops at the end of its answer", flush=True)
    if dataset.chat and not has_template:
        from corral.finetune.checks import no_chat_template

        raise SystemExit(no_chat_template(config["baseModel"], dataset.format))
    if dataset.chat and (missing := templates.missing_markers(tokenizer, hp["chatTemplate"])) and rank == 0:
        print(f"[trainer] warning: chat template {hp['chatTemplate']}: {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not a token of this tokenizer; learned as text, and an engine will not "
              "stop at the end of a turn by itself: prefer a template whose markers the tokenizer has", flush=True)
    preference = method in PREFERENCE_METHODS
    if preference:  # TRL tokenizes the pairs itself (prompt, chosen, rejected), truncating at maxSeqLen
        pairs = [pair.for_trl() for pair in dataset.examples]
        train_ids, eval_ids = split_for_eval(len(pairs), hp["valSize"], hp["seed"])
        train_rows, eval_rows = [pairs[i] for i in train_ids], [pairs[i] for i in eval_ids]
        dataset_facts: dict[str, Any] = {}  # what the encoding, packing and reporting add to the `dataset` progress line
        if rank == 0:
            print(f"[trainer] dataset: {len(pairs)} preference pairs, format {dataset.format}; {len(train_ids)} train, "
                  f"{len(eval_ids)} eval; {method} with beta {hp['prefBeta']} (TRL)", flush=True)
    else:
        encoder = Encoder(tokenizer, hp["maxSeqLen"], hp["trainOnPrompt"])
        encoding = encoder.encode_all(dataset.examples)
        examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoding.encoded]
        train_ids, eval_ids = split_for_eval(len(examples), hp["valSize"], hp["seed"])
        reasons = "; ".join(f"{n} × {why}" for why, n in encoding.drop_reasons.items())
        if rank == 0:
            print(f"[trainer] dataset: {len(dataset.examples)} examples, format {dataset.format}; {encoding.truncated} truncated to "
                  f"maxSeqLen {hp['maxSeqLen']} at turn boundaries ({encoding.turns_cut} earlier messages left out, system turns "
                  f"kept); {encoding.dropped} dropped" + (f" ({reasons})" if reasons else "")
                  + f"; {len(train_ids)} train, {len(eval_ids)} eval; "
                  f"{sum(e.trained_tokens for e in encoding.encoded)} of {sum(len(e.input_ids) for e in encoding.encoded)} tokens trained",
                  flush=True)
        train_rows = [examples[i] for i in train_ids]
        eval_rows = [{**examples[i], EVAL_MARK: True} for i in eval_ids]
        dataset_facts = {"truncated": encoding.truncated, "turnsCut": encoding.turns_cut, "dropped": encoding.dropped}
        if hp["packing"]:  # after the split: the eval examples are the same, packed or not
            train_rows = packed_rows(train_rows, hp["maxSeqLen"])
            eval_rows = [{**row, EVAL_MARK: True} for row in packed_rows(eval_rows, hp["maxSeqLen"])]
            dataset_facts["packedRows"] = len(train_rows)
            if rank == 0:
                print(f"[trainer] packing: {len(train_ids)} train examples in {len(train_rows)} rows of at most {hp['maxSeqLen']} "
                      "tokens, each example attending to itself only (position_ids restart per example)", flush=True)
    report_to = reporting(hp["reportTo"])
    log_dir = task_dir / "tensorboard"
    if report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)  # transformers 5 reads it; older ones take `logging_dir`
        dataset_facts["logDir"] = str(log_dir)
    progress.write(event=ProgressEvent.DATASET, examples=len(dataset.examples), format=dataset.format, trainExamples=len(train_ids),
                   evalExamples=len(eval_ids), **dataset_facts)
    if not train_rows:  # after the counts: the progress says what was dropped, and why
        raise SystemExit(f"no example fits maxSeqLen {hp['maxSeqLen']} ({reasons}): raise maxSeqLen or shorten the answers")

    # A full finetune keeps fp32 master weights unless pureBf16: then the weights are bf16, and so are their gradients
    # and AdamW's states (torch keeps them in the parameters' dtype), with no autocast needed.
    model_kwargs: dict[str, Any] = {"dtype": torch.float32 if method == "full" and not pure_bf16 else compute}
    if method == "qlora":
        if not cuda:
            raise SystemExit("qlora needs a CUDA GPU (bitsandbytes 4-bit); use method 'lora' on CPU")
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    # Seeded before anything random is drawn: the LoRA matrices (and any weights the checkpoint lacks) are initialised
    # when the model is built, before the Trainer seeds itself; without this, two runs with the same seed differ.
    set_seed(hp["seed"])
    model = AutoModelForCausalLM.from_pretrained(config["baseModel"], **model_kwargs)
    checkpointing = bool(hp["gradientCheckpointing"])
    if checkpointing or hp["packing"]:
        # No KV cache in training; packing needs none: transformers builds the packed rows' mask only without one.
        model.config.use_cache = False
    if method in ADAPTER_METHODS:  # dpo and orpo too: DPO's reference is this model with the adapter switched off
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            model.enable_input_require_grads()
        target = "all-linear" if hp["loraTarget"] == "all" else hp["loraTarget"].split(",")
        lora = {"r": hp["loraRank"], "lora_alpha": hp["loraAlpha"], "lora_dropout": hp["loraDropout"], "target_modules": target,
                "task_type": "CAUSAL_LM", "use_rslora": hp["useRslora"]}
        if hp["useDora"]:
            lora["use_dora"] = True
        model = get_peft_model(model, LoraConfig(**lora))

    collate = Collator(pad_id=tokenizer.pad_token_id, packed=hp["packing"])  # counts the padding it adds (not TRL's batches)

    def padding() -> dict[str, int]:
        return {} if preference else {"padTokens": collate.pad_tokens, "batchTokens": collate.tokens}

    class Report(TrainerCallback):
        started = time.monotonic()
        first_step = 0
        evaluated_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.started = time.monotonic()
            self.first_step = state.global_step
            progress.write(event=ProgressEvent.TRAINING, step=state.global_step, totalSteps=state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            if not logs or "loss" not in logs:
                return
            done = state.global_step - self.first_step
            rate = (time.monotonic() - self.started) / done if done else None
            eta = rate * (state.max_steps - state.global_step) if rate else None
            progress.write(event=ProgressEvent.STEP, step=state.global_step, totalSteps=state.max_steps, loss=logs["loss"],
                           learningRate=logs.get("learning_rate"), gradNorm=logs.get("grad_norm"),
                           epoch=round(state.epoch or 0, 4), eta=eta, **padding())

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001, ANN201
            if metrics and "eval_loss" in metrics:
                self.evaluated_at = state.global_step
                progress.write(event=ProgressEvent.EVAL, step=state.global_step, evalLoss=metrics["eval_loss"])

    class EarlyStop(TrainerCallback):
        """Stop once the eval loss has not dropped by more than `earlyStoppingThreshold` below its best for
        `earlyStoppingPatience` evaluations in a row. Not transformers' EarlyStoppingCallback: that one needs
        load_best_model_at_end, which ties the checkpoint steps to the evaluation steps; this one needs nothing, and
        the result is the model where it stopped. Its count starts again after a resume."""

        best: float | None = None
        waited = 0
        stopped_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001, ANN201
            loss = (metrics or {}).get("eval_loss")
            if loss is None or not hp["earlyStoppingPatience"]:
                return control
            if self.best is None or loss < self.best - hp["earlyStoppingThreshold"]:
                self.best, self.waited = loss, 0
            else:
                self.waited += 1
            if self.waited >= hp["earlyStoppingPatience"] and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    class Preempt(TrainerCallback):
        """Checkpoint and stop at the step end after a preemption request (all ranks at the same step)."""

        stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            requested = PreemptRequest.requested
            if size > 1 and torch.distributed.is_initialized():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
                flag = torch.tensor([1 if requested else 0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                requested = bool(flag.item())
            if requested and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    arguments_class, trainer_class, objective = TrainingArguments, Trainer, {}
    if preference:
        arguments_class, trainer_class = preference_trainer(method)
        # the chosen and the rejected answer each with their prompt, cut at maxSeqLen (TRL keeps the prompt's end)
        objective = {"beta": hp["prefBeta"], "max_length": hp["maxSeqLen"]}
    args = _arguments(
        arguments_class, **objective,
        output_dir=str(checkpoints), num_train_epochs=hp["epochs"], per_device_train_batch_size=hp["batchSize"],
        per_device_eval_batch_size=hp["batchSize"], gradient_accumulation_steps=hp["gradientAccumulation"],
        learning_rate=hp["learningRate"], lr_scheduler_type=hp["lrScheduler"], warmup_ratio=hp["warmupRatio"],
        max_grad_norm=hp["maxGradNorm"], weight_decay=hp["weightDecay"],
        gradient_checkpointing=checkpointing and method != "qlora",  # prepare_model_for_kbit_training turned it on
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=1, save_strategy="steps", save_steps=hp["saveSteps"], save_total_limit=hp["saveTotalLimit"],
        report_to=report_to, logging_dir=str(log_dir),
        eval_strategy="steps" if eval_ids else "no", eval_steps=0.1 if eval_ids else None,
        use_cpu=not cuda, bf16=precision == "bf16", fp16=precision == "fp16", seed=hp["seed"], disable_tqdm=True,
        remove_unused_columns=False, ddp_backend=None if size == 1 else ("nccl" if cuda else "gloo"),
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in each step (LoRA and full alike)
    )
    report = Report()
    preempt = Preempt()
    early = EarlyStop()
    if preference:
        import datasets

        trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_rows),
                                eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
                                processing_class=tokenizer, callbacks=[report, preempt, early])
    else:
        trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows or None, data_collator=collate,
                          callbacks=[report, preempt, early])
    trainer.train(resume_from_checkpoint=str(checkpoints / resume) if resume else None)
    if preempt.stopped_at is not None:
        saved = newest_checkpoint(checkpoints)
        progress.write(event=ProgressEvent.PREEMPTED, step=trainer.state.global_step, totalSteps=trainer.state.max_steps, checkpoint=saved)
        if rank == 0:
            print(f"[trainer] preempted: saved {saved} at step {trainer.state.global_step} of {trainer.state.max_steps}; "
                  f"exiting (code {PREEMPTED_EXIT}) to be resumed from it", flush=True)
        _leave_process_group(size)
        raise SystemExit(PREEMPTED_EXIT)
    if eval_ids and report.evaluated_at != trainer.state.global_step:
        trainer.evaluate()  # the final eval loss, whatever the steps between evaluations
    if trainer.is_world_process_zero():
        output = task_dir / "output"
        trainer.model.save_pretrained(output)
        tokenizer.save_pretrained(output)  # with the chat template trained on (a built-in one, when chosen) and its EOS
        if replaced_eos is not None:
            save_generation_config(config["baseModel"], output, templates.stop_token_ids(tokenizer, replaced_eos),
                                   tokenizer.pad_token_id)
        if early.stopped_at is not None:
            print(f"[trainer] early stopping at step {early.stopped_at} of {trainer.state.max_steps}: the eval loss has not "
                  f"improved on {early.best:.4f} for {early.waited} evaluations", flush=True)
        progress.write(event=ProgressEvent.COMPLETED, output=str(output), step=trainer.state.global_step, totalSteps=trainer.state.max_steps,
                       **padding(),
                       **({} if early.stopped_at is None else {"earlyStopped": early.stopped_at}))
        shutil.rmtree(checkpoints, ignore_errors=True)  # after `completed`: a restart in between never finds neither
    _leave_process_group(size)


def save_generation_config(base_model: str, output: Path, eos_ids: list[int], pad_id: int | None) -> None:
    """The result's generation_config.json (the adapter directory's too: merges and engines read it there) with the
    base model's settings and `eos_token_id` = the template's end of turn first, then the base model's EOS."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_model)
    except (OSError, ValueError):  # the base model has none
        generation = GenerationConfig()
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if generation.pad_token_id is None and pad_id is not None:
        generation.pad_token_id = pad_id
    generation.save_pretrained(output)


def _leave_process_group(size: int) -> None:
    """All ranks together: a rank that destroys the group while rank 0 still saves can hang the teardown (seen on
    the CPU with gloo: the output saved, `completed` written, both ranks alive minutes later; pytorch/pytorch#75097
    advises a barrier first)."""
    import torch

    if size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def die_with_launcher() -> None:
    """A rank started by torch.distributed.run runs in its own session, so stopping the task's process group (the
    launcher's) does not reach it: ask Linux to kill it when its launcher dies, however the launcher ends (a
    SIGKILL included), so no rank is left holding a GPU."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before the line above
        raise SystemExit("the launcher (torch.distributed.run) is gone")


def main() -> None:
    PreemptRequest.install()  # first: a request that comes while the model loads is kept for the first step end
    die_with_launcher()
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
