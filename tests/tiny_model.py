"""Build a tiny Qwen2 chat model offline (no model hub), as DESIGN.md measured.

2 layers, hidden 128, 2 heads (head_dim 64, which vLLM's CPU build also supports), with a
byte-level BPE tokenizer trained on a few sentences. ~1.4 MB on disk, a few seconds to build.
"""

from __future__ import annotations

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


def build_tiny_model(target: Path) -> Path:
    """Write a tiny causal LM with tokenizer and chat template to `target`; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        SENTENCES * 4,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(target)
    return target


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
