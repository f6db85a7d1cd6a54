"""Developer tools: a tiny chat model with RANDOM weights, built offline, for trying Corral without a model hub.

Why: on a machine without a hub (or before downloading gigabytes), an operator still wants to see a real
engine (`transformers serve`, vLLM's CPU build) answer through a business service, and a LoRA finetune
run end to end. This builds the smallest model those accept — a Qwen2 (2 layers, hidden 128, 2 heads:
head_dim 64, which vLLM's CPU build supports) with a byte-level BPE tokenizer trained on a few sentences
and a ChatML chat template — ~1.4 MB in a few seconds. Its answers are noise: it is labelled as such in a
README.md beside the weights (and `corral dev tiny-model` says so), so nobody mistakes it for a model.

The tests build their models with the same function (tests/tiny_model.py imports it): one way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SENTENCES = [
    "Corral moves GPU capacity between business services in milliseconds.",
    "A model pool is a set of identical inference replicas.",
    "Each replica is assigned to one business or left unassigned.",
    "Finetune tasks queue for GPUs with priorities and timeouts.",
    "hello world, the quick brown fox jumps over the lazy dog.",
]
NEEDS = ("torch", "transformers", "tokenizers")  # importable names; `pip install 'corral[train]'` brings them
MARKER = "README.md"  # written beside the weights; its first line says they are random
MARKER_TITLE = "# Corral tiny test model — RANDOM WEIGHTS"
STEPS = ("training the tokenizer", "initialising random weights", "saving the model")
README = f"""{MARKER_TITLE}

This directory was written by `corral dev tiny-model`. The weights are **random** (never trained):
the model answers with noise. It exists to try Corral without a model hub — deploy it with
`transformers serve` or vLLM's CPU build, route traffic to it through a business service, finetune it —
not to use its answers.

- architecture: Qwen2 causal LM, 2 layers, hidden size 128, 2 attention heads (head_dim 64)
- tokenizer: byte-level BPE trained on a few sentences, ChatML chat template (`<|im_start|>` … `<|im_end|>`)
- size: about 1.4 MB
"""


class MissingPackages(RuntimeError):
    """The packages the builder imports are not installed; the message says what to install."""


def missing_packages() -> list[str]:
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def is_tiny_model(directory: Path) -> bool:
    """Whether `directory` holds a model this module built (its marker README)."""
    try:
        return (directory / MARKER).read_text(encoding="utf-8").startswith(MARKER_TITLE)
    except OSError:
        return False


def build_tiny_model(target: Path, step: Callable[[str], None] = lambda _: None) -> Path:
    """Write a tiny causal LM with random weights, its tokenizer, chat template and marker README to `target`;
    return it. `step` is told each of STEPS as it begins (the CLI's progress)."""
    if missing := missing_packages():
        raise MissingPackages(
            f"building the tiny model needs {', '.join(missing)}: pip install 'corral[train]' "
            "(torch, transformers and peft; also what finetuning needs)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    step(STEPS[0])
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        SENTENCES * 4,
        trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)

    step(STEPS[1])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    step(STEPS[2])
    model.save_pretrained(target)
    (target / MARKER).write_text(README, encoding="utf-8")
    return target
