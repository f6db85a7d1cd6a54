"""The dataset formats users bring, recognised per example and turned into one of two shapes.

- `Conversation`: chat messages for the tokenizer's chat template, each marked trained or not. From
  OpenAI's `messages` (system/developer, user, assistant, tool; string content or text parts;
  `tool_calls`; `weight` 0/1 on assistant turns; `tools` beside them), ShareGPT's `conversations`
  (`from`/`value`: human, gpt, system, function_call, observation; `system` and `tools` beside them),
  Alpaca's `instruction`/`input`/`output` with `system` and `history`, and `prompt`/`completion` given as
  message lists.
- `Text`: raw text without a chat template: `prompt`/`completion` strings (the completion is trained)
  and plain `text` (all of it is trained).

Pure: no tokenizer, no I/O. A malformed example raises InvalidInput naming the dataset line and what to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.domain.errors import InvalidInput

# The names of the formats, as the preview and the task log report them.
MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION, TEXT = "messages", "sharegpt", "alpaca", "prompt-completion", "text"
FORMATS = (MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION, TEXT)
CHAT_FORMATS = frozenset({MESSAGES, SHAREGPT, ALPACA})  # prompt-completion is chat when given as message lists
NEEDS = ("needs 'messages', or 'instruction' and 'output' (with optional 'input', 'system', 'history'), "
         "'conversations' (ShareGPT), 'prompt' and 'completion', or 'text'")

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bing": "assistant", "system": "system", "function_call": "function_call", "observation": "tool",
    "tool": "tool", "function": "tool",
}


@dataclass(frozen=True)
class Conversation:
    """Chat messages as `apply_chat_template` takes them; `trained[i]` says whether message i is learned."""

    messages: list[dict[str, Any]]
    trained: list[bool]
    tools: list[dict[str, Any]] | None = None
    format: str = MESSAGES
    chat: Literal[True] = field(default=True, init=False)


@dataclass(frozen=True)
class Text:
    """Raw text: `prompt` (never trained) then `completion` (trained; plain text has an empty prompt)."""

    prompt: str
    completion: str
    format: str = TEXT
    chat: Literal[False] = field(default=False, init=False)


Example = Conversation | Text


def detect(record: Any) -> str | None:
    """The format of one example by its keys, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return MESSAGES
    if "conversations" in record:
        return SHAREGPT
    if "instruction" in record and "output" in record:
        return ALPACA
    if "prompt" in record and "completion" in record:
        return PROMPT_COMPLETION
    if "text" in record:
        return TEXT
    return None


def parse(record: Any, line: int) -> Example:
    """One example in its normalised shape, or InvalidInput naming the line and what is wrong."""
    where = f"dataset line {line}"
    if not isinstance(record, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {_kind(record)}")
    kind = detect(record)
    if kind is None:
        raise InvalidInput(f"{where}: {NEEDS}")
    return {MESSAGES: _messages, SHAREGPT: _sharegpt, ALPACA: _alpaca, PROMPT_COMPLETION: _prompt_completion, TEXT: _text}[kind](
        record, where)


# OpenAI messages ---------------------------------------------------------------------------------
def _messages(record: dict[str, Any], where: str) -> Conversation:
    messages, trained = _message_list(record["messages"], "messages", where)
    _ends_with_assistant(messages, trained, where)
    return Conversation(messages, trained, _tools(record.get("tools"), where), MESSAGES)


def _message_list(value: Any, key: str, where: str) -> tuple[list[dict[str, Any]], list[bool]]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{where}: '{key}' must be a non-empty list")
    messages, trained = [], []
    for i, message in enumerate(value):
        at = f"{where}: {key}[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise InvalidInput(f"{at} must be {{\"role\": system|user|assistant|tool, \"content\": string or a list of text "
                               f"parts}}")
        out: dict[str, Any] = {"role": role}
        calls = message.get("tool_calls")
        if calls is not None and role != "assistant":
            raise InvalidInput(f"{at}: only an assistant message has 'tool_calls'")
        if calls is not None:
            out["tool_calls"] = _tool_calls(calls, f"{at}.tool_calls")
        content = message.get("content")
        if content is None and calls:
            content = ""
        out["content"] = _content(content, f"{at}.content")
        if role == "tool":
            for extra in ("tool_call_id", "name"):
                if isinstance(message.get(extra), str):
                    out[extra] = message[extra]
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise InvalidInput(f"{at}.weight must be 0 or 1 (1: learned, 0: context only)")
        if weight == 0 and role != "assistant":
            raise InvalidInput(f"{at}.weight: only assistant messages are learned; weight applies to them only")
        messages.append(out)
        trained.append(role == "assistant" and weight == 1)
    return messages, trained


def _content(value: Any, at: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("type"), str):
                raise InvalidInput(f"{at}[{j}]: only text parts can be trained on here, got a '{_short(part['type'])}' part")
            else:
                raise InvalidInput(f"{at}[{j}] must be {{\"type\": \"text\", \"text\": string}}")
        return "".join(texts)
    raise InvalidInput(f"{at} must be a string or a list of text parts")


def _tool_calls(value: Any, at: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{at} must be a non-empty list")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None  # {"function": {...}} or {"name", "arguments"}
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidInput(f"{at}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": string, \"arguments\": "
                               "object or JSON string}}}")
        out: dict[str, Any] = {"type": "function", "function": {"name": function["name"],
                                                                "arguments": _arguments(function.get("arguments", {}), f"{at}[{j}]")}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _arguments(value: Any, at: str) -> dict[str, Any]:
    """Chat templates expect the arguments as an object; OpenAI's format gives them as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise InvalidInput(f"{at}.function.arguments is a string but not JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{at}.function.arguments must be a JSON object (or a string holding one)")
    return value


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):  # LLaMA-Factory's ShareGPT keeps them as a JSON string
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidInput(f"{where}: 'tools' is a string but not JSON") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise InvalidInput(f"{where}: 'tools' must be a list of tool (function) definitions")
    return value


def _ends_with_assistant(messages: list[dict[str, Any]], trained: list[bool], where: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise InvalidInput(f"{where}: the last message must be the assistant's (what the model learns to say)")
    if not any(trained):
        raise InvalidInput(f"{where}: every assistant message has weight 0: nothing to learn")


# ShareGPT ------------------------------------------------------------------------------------------
def _sharegpt(record: dict[str, Any], where: str) -> Conversation:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InvalidInput(f"{where}: 'conversations' must be a non-empty list")
    messages: list[dict[str, Any]] = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise InvalidInput(f"{where}: 'system' must be a string")
        if system:
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(turn, dict):
            raise InvalidInput(f"{at} must be {{\"from\": human|gpt|system|function_call|observation, \"value\": string}}")
        speaker, value = (turn.get("from"), turn.get("value")) if "from" in turn else (turn.get("role"), turn.get("content"))
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise InvalidInput(f"{at}: 'from' must be one of human, gpt, system, function_call, observation, got "
                               f"{_short(speaker)!r}")
        if not isinstance(value, str):
            raise InvalidInput(f"{at}.value must be a string")
        if role == "function_call":
            try:
                call = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                raise InvalidInput(f"{at}: a function_call's value must be JSON: {{\"name\": ..., \"arguments\": {{...}}}}") from None
            calls = _tool_calls(call if isinstance(call, list) else [call], f"{at}.value")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": value})
    trained = [m["role"] == "assistant" for m in messages]
    _ends_with_assistant(messages, trained, where)
    return Conversation(messages, trained, _tools(record.get("tools"), where), SHAREGPT)


# Alpaca --------------------------------------------------------------------------------------------
def _alpaca(record: dict[str, Any], where: str) -> Conversation:
    for key in ("instruction", "input", "output", "system"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise InvalidInput(f"{where}: '{key}' must be a string")
    messages: list[dict[str, Any]] = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise InvalidInput(f"{where}: 'history' must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InvalidInput(f"{where}: history[{i}] must be an [instruction, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    return Conversation(messages, [m["role"] == "assistant" for m in messages], None, ALPACA)


# prompt / completion and plain text --------------------------------------------------------------
def _prompt_completion(record: dict[str, Any], where: str) -> Example:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise InvalidInput(f"{where}: 'completion' is empty: nothing to learn")
        return Text(prompt, completion, PROMPT_COMPLETION)
    if isinstance(prompt, list) and isinstance(completion, list):
        before, _ = _message_list(prompt, "prompt", where)
        after, trained = _message_list(completion, "completion", where)
        messages = before + after
        marks = [False] * len(before) + trained
        _ends_with_assistant(messages, marks, where)
        return Conversation(messages, marks, _tools(record.get("tools"), where), PROMPT_COMPLETION)
    raise InvalidInput(f"{where}: 'prompt' and 'completion' must both be strings, or both lists of messages")


def _text(record: dict[str, Any], where: str) -> Text:
    if not isinstance(record["text"], str) or not record["text"]:
        raise InvalidInput(f"{where}: 'text' must be a non-empty string")
    return Text("", record["text"], TEXT)


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(type(value), "null") \
        if value is not None else "null"


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"
