"""Built-in chat templates, for chat datasets on a tokenizer that has none (a base model's) or the wrong one.

The `chatTemplate` hyperparameter picks one: `model` (the default) is the tokenizer's own template; a name
below replaces it, in the trainer and in the preview alike, and the result's tokenizer is saved with it (so
the merged model and `transformers serve` format chats the way the model was trained). A small, fixed set:
the conventions most open models use, written in the style of their families' templates (system, user and
assistant turns; tool calls are written as text by `corral.finetune.examples` when a template has no place
for them).

A template's turn markers (`<|im_start|>`, `<|eot_id|>` …) should be tokens of the tokenizer; when they are
not, they are learned as plain text and an engine will not stop at the end of a turn by itself. `missing_markers`
says which, so the trainer's log can warn before GPU hours are spent.
"""

from __future__ import annotations

from typing import Any

from corral.domain.hyperparameters import MODEL_TEMPLATE as MODEL  # the tokenizer's own template
from corral.domain.hyperparameters import TEMPLATE_NAMES

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"

TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, Yi, many finetunes): <|im_start|>role\n…<|im_end|>\n
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Qwen 2.5: ChatML with Qwen's default system prompt when the conversation has none.
    "qwen": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: headers and <|eot_id|>, BOS written by the template.
    "llama3": (
        _BOS + "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Mistral (instruct v3 and later): [INST] … [/INST] answer</s>, the system prompt in its own markers.
    "mistral": (
        _BOS + "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ '[INST]' + message['content'] + '[/INST]' }}{% endif %}{% endfor %}"
    ),
    # Gemma: user and model turns (a system or tool message is a user turn).
    "gemma": (
        _BOS + "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = 'user' %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}
NAMES: tuple[str, ...] = TEMPLATE_NAMES  # the hyperparameter's choices: `model`, then one per template above
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}


# The token each built-in template ends an assistant turn with (mistral's is the tokenizer's own EOS).
END_OF_TURN: dict[str, str] = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
_SENTINEL = "\u2063corral-turn\u2063"  # an answer no real conversation has, to find what the template writes after it


def replace_eos(tokenizer: Any, name: str) -> str | None:
    """LLaMA-Factory's `replace_eos`: a base model trained on a built-in template learns to end its answers with the
    template's end-of-turn token (`<|im_end|>` …), so that token must be its EOS, or an engine serving the result never
    stops (it waits for the base model's EOS, which training never showed after an answer). Makes the end-of-turn
    token the tokenizer's EOS, before the examples are encoded (plain-text completions then end with it too, and the
    trainer saves the tokenizer so) and keeps the old EOS as the pad token when there was none. Returns the old EOS
    when it replaced it; None when nothing changed (`model`, mistral, a template whose end of turn already is the EOS,
    or a marker that is not a token of this tokenizer: `missing_markers` warns about that one)."""
    marker = END_OF_TURN.get(name)
    if marker is None or marker == tokenizer.eos_token or marker not in tokenizer.get_vocab():
        return None
    old = tokenizer.eos_token
    if tokenizer.pad_token is None and old is not None:
        tokenizer.pad_token = old
    tokenizer.eos_token = marker
    return old


def stop_token_ids(tokenizer: Any, replaced: str | None) -> list[int]:
    """`generation_config.eos_token_id` for a result: the (new) EOS first, and the base model's old EOS too, so
    generation stops at either."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if replaced is not None and (old := tokenizer.convert_tokens_to_ids(replaced)) is not None and old not in ids:
        ids.append(old)
    return ids


def end_of_turn(tokenizer: Any) -> str | None:
    """The special token the tokenizer's (current) chat template writes right after an assistant's answer, or None
    when it writes none (found by rendering one answer: works for the model's own template as for a built-in one)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                                             tokenize=False)
    except Exception:  # a template that refuses the probe: nothing to tell
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    after = text.split(_SENTINEL, 1)[1]
    special = set(getattr(tokenizer, "all_special_tokens", []) or []) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    found = [(after.find(token), token) for token in special if token and after.find(token) >= 0]
    return min(found)[1] if found and min(found)[0] <= len(after) - len(after.lstrip()) else None


def apply(tokenizer: Any, name: str) -> bool:
    """Give `tokenizer` the chosen template (nothing for `model`); whether it then has one at all."""
    if name != MODEL:
        tokenizer.chat_template = TEMPLATES[name]
    return bool(getattr(tokenizer, "chat_template", None))


def missing_markers(tokenizer: Any, name: str) -> list[str]:
    """The template's turn markers that are not single tokens of `tokenizer` (learned as text, then)."""
    vocabulary = tokenizer.get_vocab()
    return [marker for marker in MARKERS.get(name, ()) if marker not in vocabulary]
