"""Every dataset format users bring, detected per example, JSONL or a JSON array, and a malformed example of each
refused with its line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.domain.errors import InvalidInput
from corral.finetune.dataset import load_dataset, read_dataset
from corral.finetune.formats import Conversation, Text, parse


def write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def roles(example: Conversation) -> list[str]:
    return [m["role"] for m in example.messages]


def test_openai_messages_with_system_turns_parts_tools_and_weights() -> None:
    record = {
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny.", "weight": 0},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
    }
    example = parse(record, 1)
    assert isinstance(example, Conversation) and example.format == "messages" and example.chat
    assert roles(example) == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert example.messages[1]["content"] == "Weather in Paris?"
    assert example.messages[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Paris"}}  # parsed
    assert example.messages[3]["tool_call_id"] == "c1"
    assert example.trained == [False, False, True, False, False, False, True]  # weight 0: context only
    assert example.tools and example.tools[0]["function"]["name"] == "weather"


def test_sharegpt_with_system_function_call_and_observation() -> None:
    record = {"system": "You are helpful.", "tools": json.dumps([{"name": "weather"}]), "conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "rain"},
        {"from": "gpt", "value": "Rain."},
    ]}
    example = parse(record, 1)
    assert isinstance(example, Conversation) and example.format == "sharegpt"
    assert roles(example) == ["system", "user", "assistant", "tool", "assistant"]
    assert example.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert example.trained == [False, False, True, False, True] and example.tools == [{"name": "weather"}]


def test_alpaca_keeps_system_and_history() -> None:
    record = {"system": "Be kind.", "history": [["Hi", "Hello!"], ["How are you?", "Fine."]],
              "instruction": "Translate", "input": "chat", "output": "cat"}
    example = parse(record, 1)
    assert isinstance(example, Conversation) and example.format == "alpaca"
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "How are you?"), ("assistant", "Fine."),
        ("user", "Translate\n\nchat"), ("assistant", "cat")]
    assert example.trained == [False, False, True, False, True, False, True]


def test_prompt_completion_as_text_or_messages_and_plain_text() -> None:
    text = parse({"prompt": "2 + 2 =", "completion": " 4"}, 1)
    assert isinstance(text, Text) and (text.prompt, text.completion, text.format) == ("2 + 2 =", " 4", "prompt-completion")
    assert not text.chat
    chat = parse({"prompt": [{"role": "user", "content": "2 + 2?"}], "completion": [{"role": "assistant", "content": "4"}]}, 1)
    assert isinstance(chat, Conversation) and chat.trained == [False, True] and chat.format == "prompt-completion"
    plain = parse({"text": "Corral moves GPUs."}, 1)
    assert isinstance(plain, Text) and (plain.prompt, plain.completion, plain.format) == ("", "Corral moves GPUs.", "text")


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "dataset line 2: messages[1] must be"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "dataset line 2: the last message must be the assistant's"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, {"role": "assistant", "content": "x"}]},
     "dataset line 2: messages[0].content[0]: only text parts"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
     "dataset line 2: messages[1].tool_calls[0].function.arguments is a string but not JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]},
     "dataset line 2: every assistant message has weight 0"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     "dataset line 2: conversations[1]: 'from' must be one of human, gpt"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]}, "dataset line 2: conversations[1].value must be"),
    ({"instruction": "a", "output": "b", "history": [["only one"]]}, "dataset line 2: history[0] must be an [instruction, response] pair"),
    ({"instruction": "a", "output": 3}, "dataset line 2: 'output' must be a string"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "dataset line 2: 'prompt' and 'completion' must both be"),
    ({"prompt": "a", "completion": ""}, "dataset line 2: 'completion' is empty"),
    ({"text": ""}, "dataset line 2: 'text' must be a non-empty string"),
    ({"instruction": 3}, "dataset line 2: needs 'messages', or 'instruction' and 'output'"),
    ("[1, 2]", "dataset line 2: expected a JSON object, got an array"),
    ("{not json", "dataset line 2: not valid JSON"),
])
def test_a_malformed_example_of_each_format_names_its_line(tmp_path: Path, bad: object, message: str) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write(tmp_path / "data.jsonl", [good, bad, good])
    with pytest.raises(InvalidInput) as refused:
        load_dataset(path)
    assert message in refused.value.message


def test_mixed_formats_in_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                                        "", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                                        {"instruction": "a", "output": "b"}, {"prompt": "a", "completion": "b"}, {"text": "a"}])
    dataset = read_dataset(path)
    assert dataset.formats == {"messages": 1, "sharegpt": 1, "alpaca": 1, "prompt-completion": 1, "text": 1}
    assert dataset.format == "mixed (messages 1, sharegpt 1, alpaca 1, prompt-completion 1, text 1)" and dataset.chat
    assert read_dataset(write(tmp_path / "t.jsonl", [{"text": "a"}])).format == "text"
    assert not read_dataset(tmp_path / "t.jsonl").chat


def test_a_json_array_file_with_line_numbers(tmp_path: Path) -> None:
    rows = [{"instruction": "a", "output": "b"}, {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    path = tmp_path / "data.json"
    path.write_text("\ufeff" + json.dumps(rows, indent=2))
    dataset = read_dataset(path)
    assert dataset.formats == {"alpaca": 1, "sharegpt": 1}
    # A bad example is reported at the line where it starts; a syntax error where it is.
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"text": "x"},\n  {\n    "conversations": []\n  }\n]\n')
    with pytest.raises(InvalidInput, match="dataset line 4: 'conversations' must be a non-empty list"):
        load_dataset(path)
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(InvalidInput, match="dataset line 4: not valid JSON"):
        load_dataset(path)
    path.write_text("[]")
    with pytest.raises(InvalidInput, match="has no examples"):
        load_dataset(path)
