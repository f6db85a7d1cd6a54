"""Examples built right, on real tokenizers: the tiny model's (ChatML, no BOS) and one whose chat template writes
BOS while encoding adds it too. Labels only on the assistant's turns and their end-of-turn token, one BOS,
truncation from the prompt side, answers that cannot fit dropped."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.finetune.examples import IGNORE, Dropped, Encoded, Encoder, length_histogram
from corral.finetune.formats import parse
from tests.tiny_model import build_bos_tokenizer, build_tiny_model

transformers = pytest.importorskip("transformers")

CHAT = {"messages": [
    {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "again"},
    {"role": "assistant", "content": "lazy dog"},
]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return transformers.AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def bos(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return transformers.AutoTokenizer.from_pretrained(build_bos_tokenizer(tmp_path_factory.mktemp("bos") / "t"))


def trained_text(tokenizer: Any, encoded: Encoded) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_labels_only_on_assistant_turns_and_their_end_of_turn(tiny: Any) -> None:
    encoded = Encoder(tiny, 512).encode(parse(CHAT, 1))
    assert isinstance(encoded, Encoded) and not encoded.truncated
    assert trained_text(tiny, encoded) == ["the quick fox<|im_end|>\n", "lazy dog<|im_end|>\n"]
    # The ids are the template's text, whole: nothing lost between the pieces.
    assert tiny.decode(encoded.input_ids) == tiny.apply_chat_template(CHAT["messages"], tokenize=False)
    # trainOnPrompt: the old behaviour, every token learned.
    everything = Encoder(tiny, 512, train_on_prompt=True).encode(parse(CHAT, 1))
    assert isinstance(everything, Encoded) and everything.labels == everything.input_ids


def test_every_format_is_masked_the_same_way(tiny: Any) -> None:
    encoder = Encoder(tiny, 512)
    alpaca = encoder.encode(parse({"system": "be brief", "history": [["hi", "hello"]], "instruction": "a", "output": "b"}, 1))
    assert trained_text(tiny, alpaca) == ["hello<|im_end|>\n", "b<|im_end|>\n"]  # type: ignore[arg-type]
    sharegpt = encoder.encode(parse({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, 1))
    assert trained_text(tiny, sharegpt) == ["yo<|im_end|>\n"]  # type: ignore[arg-type]
    weighted = encoder.encode(parse({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                                                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, 1))
    assert trained_text(tiny, weighted) == ["d<|im_end|>\n"]  # type: ignore[arg-type]
    completion = encoder.encode(parse({"prompt": "hello world", "completion": " the fox"}, 1))
    assert trained_text(tiny, completion) == [" the fox<|im_end|>"]  # type: ignore[arg-type]  (EOS ends the completion)
    plain = encoder.encode(parse({"text": "hello world"}, 1))
    assert trained_text(tiny, plain) == ["hello world<|im_end|>"]  # type: ignore[arg-type]


def test_tool_calls_are_rendered_and_learned(tiny: Any) -> None:
    record = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny"}]}
    # A template without tool support: calls written as <tool_call> text, results as <tool_response>.
    encoded = Encoder(tiny, 512).encode(parse(record, 1))
    runs = trained_text(tiny, encoded)  # type: ignore[arg-type]
    assert runs == ['<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n', "It is sunny<|im_end|>\n"]
    assert "<tool_response>\nsunny\n</tool_response>" in tiny.decode(encoded.input_ids)  # type: ignore[union-attr]
    # A template with tool support gets the calls as objects (arguments parsed from OpenAI's JSON string).
    tiny_tools = tiny.__class__.from_pretrained(tiny.name_or_path)
    tiny_tools.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }}"
        " {{ c.function.arguments.city }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    encoded = Encoder(tiny_tools, 512).encode(parse(record, 1))
    assert trained_text(tiny_tools, encoded)[0] == "CALL get Paris<|im_end|>\n"  # type: ignore[arg-type]


def test_a_template_that_writes_bos_gets_one_bos(bos: Any, tiny: Any) -> None:
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    naive = bos(bos.apply_chat_template(messages, tokenize=False))["input_ids"]
    assert naive[:2] == [bos.bos_token_id, bos.bos_token_id], "the tokenizer really does add a second BOS"
    encoder = Encoder(bos, 512)
    assert encoder.adds_bos
    chat = encoder.encode(parse({"messages": messages}, 1))
    assert isinstance(chat, Encoded) and chat.input_ids[0] == bos.bos_token_id and chat.input_ids.count(bos.bos_token_id) == 1
    assert chat.labels[0] == IGNORE and trained_text(bos, chat) == ["world<|eot_id|>"]
    # Plain text has no template: the tokenizer's BOS is added, once.
    plain = encoder.encode(parse({"text": "hello world"}, 1))
    assert isinstance(plain, Encoded) and plain.input_ids.count(bos.bos_token_id) == 1 and plain.input_ids[0] == bos.bos_token_id
    # The tiny model's tokenizer has no BOS: none is invented.
    assert tiny.bos_token_id is None and not Encoder(tiny, 512).adds_bos


def test_truncation_cuts_the_prompt_and_drops_what_cannot_fit(tiny: Any, bos: Any) -> None:
    long_question = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": long_question},
                           {"role": "assistant", "content": "hello world"}]}
    full = Encoder(tiny, 4096).encode(parse(record, 1))
    assert isinstance(full, Encoded) and len(full.input_ids) > 64
    cut = Encoder(tiny, 48).encode(parse(record, 1))
    assert isinstance(cut, Encoded) and cut.truncated and 44 <= len(cut.input_ids) <= 48 and cut.total_tokens == len(full.input_ids)
    text = tiny.decode(cut.input_ids)
    # The system turn and the user turn's header stay; the oldest part of the question goes; the answer stays whole.
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n") and cut.turns_cut == 0
    assert text.endswith(" lazy dog<|im_end|>\n<|im_start|>assistant\nhello world<|im_end|>\n")
    assert trained_text(tiny, cut) == ["hello world<|im_end|>\n"]
    # With a BOS, the BOS stays in front, once.
    with_bos = Encoder(bos, 48).encode(parse(record, 1))
    assert isinstance(with_bos, Encoded) and with_bos.input_ids[0] == bos.bos_token_id and len(with_bos.input_ids) <= 48
    assert with_bos.input_ids.count(bos.bos_token_id) == 1 and trained_text(bos, with_bos) == ["hello world<|eot_id|>"]
    assert bos.decode(with_bos.input_ids).startswith("<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>")
    # An answer longer than maxSeqLen: dropped, not cut.
    answer_too_long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_question}]}
    dropped = Encoder(tiny, 32).encode(parse(answer_too_long, 1))
    assert isinstance(dropped, Dropped) and "longer than maxSeqLen (32 tokens)" in dropped.reason
    # Plain text keeps its beginning.
    plain = Encoder(tiny, 16).encode(parse({"text": long_question}, 1))
    assert isinstance(plain, Encoded) and plain.truncated and plain.input_ids == Encoder(tiny, 4096).encode(
        parse({"text": long_question}, 1)).input_ids[:16]  # type: ignore[union-attr]
    # The counts a task reports.
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    encoding = Encoder(tiny, 48).encode_all([parse(r, 1) for r in (short, record, answer_too_long, record)])
    assert (len(encoding.encoded), encoding.truncated, encoding.dropped) == (3, 2, 1)
    assert len(encoding.lengths) == 4 and list(encoding.drop_reasons.values()) == [1]


def test_truncation_keeps_the_system_turn_and_never_starts_mid_turn(tiny: Any) -> None:
    """A conversation too long for maxSeqLen loses its earliest exchanges whole: the window starts with the system turn,
    then a user turn, never inside an earlier answer (the old cut trained orphan fragments of answers without their
    question or system prompt)."""
    answers = [" ".join(["the quick brown fox"] * 3) + f" {i}" for i in range(6)]
    messages = [{"role": "system", "content": "be brief"}]
    for i, answer in enumerate(answers):
        messages += [{"role": "user", "content": f"hello world {i}"}, {"role": "assistant", "content": answer}]
    full = Encoder(tiny, 4096).encode(parse({"messages": messages}, 1))
    last = Encoder(tiny, 4096).encode(parse({"messages": [messages[0], *messages[-2:]]}, 1))
    assert isinstance(full, Encoded) and isinstance(last, Encoded)
    for limit in range(len(last.input_ids), len(full.input_ids), 7):
        cut = Encoder(tiny, limit).encode(parse({"messages": messages}, 1))
        assert isinstance(cut, Encoded) and cut.truncated and len(cut.input_ids) <= limit, limit
        text = tiny.decode(cut.input_ids)
        assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world "), (limit, text[:80])
        kept = text.count("<|im_start|>assistant")
        assert cut.turns_cut == 2 * (len(answers) - kept)  # whole exchanges: a question and its answer
        assert trained_text(tiny, cut) == [f"{a}<|im_end|>\n" for a in answers[-kept:]]  # every answer whole
    # The counts of a dataset: examples cut and messages left out.
    encoding = Encoder(tiny, len(last.input_ids) + 40).encode_all([parse({"messages": messages}, 1)] * 2)
    assert encoding.truncated == 2 and encoding.turns_cut == 2 * encoding.encoded[0].turns_cut > 0
    # Not even the system turn, the last question's header and its answer fit: dropped, with the reason.
    dropped = Encoder(tiny, 24).encode(parse({"messages": messages}, 1))
    assert isinstance(dropped, Dropped) and "the last exchange with the system turn is longer than maxSeqLen" in dropped.reason


def test_tool_schemas_go_into_the_system_turn_when_the_template_has_no_place_for_them(tiny: Any) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather of a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    record = {"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}], "tools": tools}
    encoder = Encoder(tiny, 4096)
    encoded = encoder.encode(parse(record, 1))
    assert isinstance(encoded, Encoded)
    text = tiny.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system\n# Tools") and json.dumps(tools[0]) in text.split("<|im_end|>")[0]
    assert trained_text(tiny, encoded) == ["sunny<|im_end|>\n"]  # the schema is context, never trained
    # An existing system turn keeps its text, the schemas after it.
    with_system = {**record, "messages": [{"role": "system", "content": "be brief"}, *record["messages"]]}
    text = tiny.decode(encoder.encode(parse(with_system, 1)).input_ids)  # type: ignore[union-attr]
    assert text.startswith("<|im_start|>system\nbe brief\n\n# Tools") and text.count("<|im_start|>system") == 1
    # A template that renders `tools` itself gets them there, not twice.
    own = tiny.__class__.from_pretrained(tiny.name_or_path)
    own.chat_template = ("{% if tools %}TOOLS {{ tools | length }}\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text = own.decode(Encoder(own, 4096).encode(parse(record, 1)).input_ids)  # type: ignore[union-attr]
    assert text.startswith("TOOLS 1\n<|im_start|>user") and "# Tools" not in text


def test_length_histogram_marks_what_max_seq_len_cuts() -> None:
    bins = length_histogram([10, 20, 30, 100, 300], 64)
    assert [(b["min"], b["max"], b["count"], b["overMaxSeqLen"]) for b in bins] == [
        (0, 16, 1, False), (17, 32, 2, False), (33, 64, 0, False), (65, 128, 1, True), (129, 256, 0, True), (257, 512, 1, True)]
    assert sum(b["count"] for b in length_histogram([5, 5, 1000], 1024)) == 3
    assert length_histogram([], 64) == []


def test_an_example_the_template_refuses_is_dropped_with_the_reason(tiny: Any) -> None:
    strict = tiny.__class__.from_pretrained(tiny.name_or_path)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                            + tiny.chat_template)
    encoding = Encoder(strict, 512).encode_all([parse(CHAT, 1), parse({"instruction": "a", "output": "b"}, 2)])
    assert (len(encoding.encoded), encoding.dropped) == (1, 1) and len(encoding.lengths) == 1
    (reason,) = encoding.drop_reasons
    assert "the chat template cannot render this conversation" in reason and "System role not supported" in reason
