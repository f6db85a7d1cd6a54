"""Tiny models and tokenizers for the tests, built offline (no model hub), as DESIGN.md measured.

The model itself is `corral.devtools.build_tiny_model` (what `corral dev tiny-model` runs): one way to
build it. The tokenizer variants below exist only for finetuning edge cases.
"""

from __future__ import annotations

from pathlib import Path

from corral.devtools import CHAT_TEMPLATE, SENTENCES, build_tiny_model

__all__ = ["CHAT_TEMPLATE", "SENTENCES", "build_tiny_model", "build_bos_tokenizer", "build_templateless_tokenizer"]


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))


# A LLaMA-3-like chat template that writes BOS itself, for a tokenizer that also adds BOS to encoded text:
# the case where a naive `tokenizer(apply_chat_template(...))` gets two BOS tokens.
BOS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_bos_tokenizer(target: Path) -> Path:
    """Write a tokenizer (no model) that adds `<s>` to encoded text and whose chat template writes `<s>` too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    target.mkdir(parents=True, exist_ok=True)
    special = ["<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        SENTENCES * 4,
        trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|eot_id|>", pad_token="<pad>")
    tokenizer.chat_template = BOS_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    return target


def build_templateless_tokenizer(target: Path) -> Path:
    """The tiny model's tokenizer without a chat template (a base model's, say)."""
    from transformers import AutoTokenizer

    build_tiny_model(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    for name in ("chat_template.jinja", "chat_template.json"):
        (target / name).unlink(missing_ok=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return target
