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


def apply(tokenizer: Any, name: str) -> bool:
    """Give `tokenizer` the chosen template (nothing for `model`); whether it then has one at all."""
    if name != MODEL:
        tokenizer.chat_template = TEMPLATES[name]
    return bool(getattr(tokenizer, "chat_template", None))


def missing_markers(tokenizer: Any, name: str) -> list[str]:
    """The template's turn markers that are not single tokens of `tokenizer` (learned as text, then)."""
    vocabulary = tokenizer.get_vocab()
    return [marker for marker in MARKERS.get(name, ()) if marker not in vocabulary]
