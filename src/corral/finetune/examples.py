"""Training examples built right: token ids, labels on what the model should learn, and honest truncation.

- Labels cover the assistant's turns only (and their end-of-turn token, as the chat template writes it);
  system, user and tool text is context (label -100). `trainOnPrompt` labels every token instead.
- The text is cut at the turn boundaries the chat template itself produces: rendering the conversation
  up to each assistant turn with the generation prompt gives where the turn starts, rendering it with the
  turn gives where it ends. Each piece is tokenized on its own (as the model sees it at inference: the
  prompt, then its own tokens), so no token straddles a prompt and an answer.
- One BOS at most: a chat template that writes BOS itself gets none added; a tokenizer that adds BOS to
  encoded text gets it once, in front.
- Too long for `maxSeqLen`: a conversation is cut at turn boundaries, never inside an answer: its earliest
  exchanges (a user turn and what follows it up to the next user turn) are left out, one at a time, the system
  turn always kept, until it fits; when even the system turn and the last exchange do not fit, the oldest part of
  that exchange's user message goes (its header stays). So no window starts in the middle of an earlier answer
  or without its system prompt. A prompt/completion example is cut on the prompt side (oldest tokens first, BOS
  kept); plain text keeps its beginning. An example whose last answer cannot fit is dropped. All are counted
  (`truncated`, `turns_cut`, `dropped`).
- Tool schemas (`tools`) go where the template puts them; a template with no place for them (every built-in one,
  and many models' own) gets them in the system turn, Hermes/Qwen style (`<tools>` … `</tools>`, the calls as
  `<tool_call>` text), so the schema a trained call answers is in the context it was trained with.

Imports no ML library: works on any `transformers` tokenizer it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral.finetune.formats import Conversation, Example, Text

IGNORE = -100
# The tool schemas' preamble in the system turn for a template that has no place for them (Qwen 2.5's wording).
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:")
TOOLS_FOOTER = ("For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
                "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


class TemplateError(ValueError):
    """The chat template cannot render an example (e.g. roles that do not alternate)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    total_tokens: int  # before truncation
    truncated: bool = False
    turns_cut: int = 0  # earlier messages left out to fit maxSeqLen (the system turn is never one of them)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class Dropped:
    reason: str
    total_tokens: int


@dataclass
class Encoding:
    """A dataset encoded: what trains, and what was cut or left out."""

    encoded: list[Encoded] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens of every example before truncation
    truncated: int = 0
    turns_cut: int = 0  # messages left out of truncated conversations, all examples together
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)


class Encoder:
    def __init__(self, tokenizer: Any, max_len: int, train_on_prompt: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.train_on_prompt = train_on_prompt
        self.bos_id = tokenizer.bos_token_id
        self.bos = tokenizer.bos_token
        self.eos_id = tokenizer.eos_token_id
        self.eos = tokenizer.eos_token
        probe = tokenizer("a")["input_ids"]  # does encoding add BOS by itself (LLaMA, Mistral, Gemma ...)?
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
        self.template_tool_calls = "tool_calls" in template
        self.template_tool_role = "tool" in template.replace("tool_calls", "")
        self.template_tools = "tools" in template.replace("tool_calls", "")  # does it render the `tools` schemas?

    # pieces --------------------------------------------------------------------------------------
    def pieces(self, example: Example) -> list[tuple[str, bool, bool]]:
        """(text, trained, is the last answer) pieces whose concatenation is the whole example's text."""
        if isinstance(example, Text):
            completion = example.completion + (self.eos or "")
            return ([(example.prompt, False, False)] if example.prompt else []) + [(completion, True, True)]
        return self._conversation_pieces(example)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # jinja2's TemplateError ("roles must alternate"), a missing template
            raise TemplateError(f"the chat template cannot render this conversation: {exc}") from None

    def with_tools(self, example: Example) -> Example:
        """The conversation with its tool schemas in the system turn when the template has no place for them (a new
        system turn when it has none); unchanged otherwise."""
        if not isinstance(example, Conversation) or not example.tools or self.template_tools:
            return example
        schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in example.tools)
        block = (f"{TOOLS_HEADER}\n<tools>\n{schemas}\n</tools>\n\n{TOOLS_FOOTER}")
        messages, trained = list(example.messages), list(example.trained)
        if messages and messages[0].get("role") == "system":
            first = messages[0].get("content") or ""
            messages[0] = {**messages[0], "content": f"{first}\n\n{block}" if first else block}
        else:
            messages.insert(0, {"role": "system", "content": block})
            trained.insert(0, False)
        return Conversation(messages, trained, None, example.format)

    def _conversation_pieces(self, example: Conversation) -> list[tuple[str, bool, bool]]:
        messages = [self._for_template(m) for m in example.messages]
        tools = example.tools
        full = self._render(messages, tools, False)
        last = max(i for i, trained in enumerate(example.trained) if trained)
        pieces: list[tuple[str, bool, bool]] = []
        cursor = 0
        for i, trained in enumerate(example.trained):
            if not trained:
                continue
            start, end = self._turn_span(messages, tools, full, i, cursor)
            pieces += [(full[cursor:start], False, False), (full[start:end], True, i == last)]
            cursor = end
        pieces.append((full[cursor:], False, False))
        return [p for p in pieces if p[0]]

    def _turn_span(self, messages: list[dict[str, Any]], tools: Any, full: str, i: int, cursor: int) -> tuple[int, int]:
        """Where assistant turn i lies in `full`: from after the generation prompt to the end of the turn as the
        template writes it (its end-of-turn token included)."""
        before = self._render(messages[:i], tools, True) if i else ""
        through = self._render(messages[: i + 1], tools, False)
        if full.startswith(through) and through.startswith(before) and len(before) >= cursor and len(through) > len(before):
            return len(before), len(through)
        # A template that renders a turn differently once later turns follow (e.g. reasoning kept only in the last
        # turn): find the turn's text itself, then its end-of-turn token.
        content = messages[i]["content"].strip()
        start = full.find(content, cursor) if content else -1
        if start < 0:
            raise TemplateError(f"cannot find assistant message {i} in the chat template's rendering")
        end = start + len(content)
        if self.eos and full.startswith(self.eos, end):
            end += len(self.eos)
        return start, end

    def _for_template(self, message: dict[str, Any]) -> dict[str, Any]:
        """Tool calls and tool results written as text (Hermes/Qwen style) for a template that has no place for them."""
        message = dict(message)
        if message.get("tool_calls") and not self.template_tool_calls:
            calls = "\n".join(f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>" for c in message.pop("tool_calls"))
            message["content"] = (message["content"] + "\n" if message["content"] else "") + calls
        if message["role"] == "tool" and not self.template_tool_role:
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        return message

    # tokens -------------------------------------------------------------------------------------
    def _tokens(self, example: Example) -> tuple[list[int], list[int], list[bool], int]:
        """(head: the BOS, if any; the ids after it; which of them are trained; where the last answer starts)."""
        pieces = self.pieces(example)
        ids: list[int] = []
        trained: list[bool] = []
        answer_start = 0
        for text, learn, last in pieces:
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if last:
                answer_start = len(ids)
            ids += tokens
            trained += [learn] * len(tokens)
        head: list[int] = []
        if ids and self.bos_id is not None and ids[0] == self.bos_id:  # the chat template wrote BOS
            head, ids, trained, answer_start = ids[:1], ids[1:], trained[1:], max(0, answer_start - 1)
        elif self.adds_bos:
            head = [self.bos_id]
        return head, ids, trained, answer_start

    def encode(self, example: Example) -> Encoded | Dropped:
        example = self.with_tools(example)
        head, ids, trained, answer_start = self._tokens(example)
        total = len(head) + len(ids)
        if not any(trained[answer_start:]):
            return Dropped("nothing to learn after tokenization", total)
        truncated, turns_cut = False, 0
        room = self.max_len - len(head)
        if len(ids) > room:
            if isinstance(example, Text) and not example.prompt:  # plain text: keep the beginning
                ids, trained = ids[:room], trained[:room]
            elif len(ids) - answer_start > room:
                return Dropped(f"the answer alone is longer than maxSeqLen ({self.max_len} tokens)", total)
            elif isinstance(example, Text):  # a prompt/completion: cut the prompt side, the oldest tokens first
                ids, trained = ids[-room:], trained[-room:]
            else:
                window = self._window(example, room)
                if window is None:
                    return Dropped(f"the last exchange with the system turn is longer than maxSeqLen ({self.max_len} tokens)", total)
                ids, trained, turns_cut = window
            truncated = True
        labels = [t if (learn or self.train_on_prompt) else IGNORE for t, learn in zip(ids, trained, strict=True)]
        labels_head = [h if self.train_on_prompt else IGNORE for h in head] if head else []
        return Encoded(head + ids, labels_head + labels, total, truncated, turns_cut)

    def _window(self, example: Conversation, room: int) -> tuple[list[int], list[bool], int] | None:
        """A conversation too long for `room` tokens cut at turn boundaries (see the module doc): (ids, trained, messages
        left out), or None when even the system turn, the last exchange's header and its answer do not fit."""
        messages, trained = example.messages, example.trained
        system = 1 if messages and messages[0].get("role") == "system" else 0
        last = max(i for i, learn in enumerate(trained) if learn)
        starts = [i for i in range(system, last + 1) if i == system or messages[i].get("role") == "user"]

        def fitting(kept: list[dict[str, Any]], start: int) -> tuple[list[int], list[bool]] | None:
            candidate = Conversation(messages[:system] + kept, trained[:system] + trained[start:], example.tools, example.format)
            try:
                _, ids, flags, _ = self._tokens(candidate)
            except TemplateError:  # e.g. a template that needs the conversation to start otherwise
                return None
            return (ids, flags) if len(ids) <= room and any(flags) else None

        for start in starts[1:]:  # the whole conversation (starts[0]) is what did not fit
            if (found := fitting(messages[start:], start)) is not None:
                return *found, start - system
        start = starts[-1]
        first = messages[start]
        content = first.get("content")
        if first.get("role") != "user" or not isinstance(content, str):
            return None
        best, low, high = None, 0, len(content)  # the longest tail of the user message that fits
        while low <= high:
            keep = (low + high) // 2
            found = fitting([{**first, "content": content[len(content) - keep:]}, *messages[start + 1:]], start)
            if found is not None:
                best, low = found, keep + 1
            else:
                high = keep - 1
        return None if best is None else (*best, start - system)

    def encode_all(self, examples: Iterable[Example]) -> Encoding:
        result = Encoding()
        for example in examples:
            try:
                outcome: Encoded | Dropped = self.encode(example)
                result.lengths.append(outcome.total_tokens)
            except TemplateError as exc:  # e.g. a template that refuses a system turn: that example cannot train
                outcome = Dropped(str(exc)[:300], 0)
            if isinstance(outcome, Dropped):
                result.dropped += 1
                result.drop_reasons[outcome.reason] = result.drop_reasons.get(outcome.reason, 0) + 1
            else:
                result.truncated += outcome.truncated
                result.turns_cut += outcome.turns_cut
                result.encoded.append(outcome)
        return result

    # preview ------------------------------------------------------------------------------------
    def runs(self, encoded: Encoded) -> list[tuple[str, bool]]:
        """The example's text as (text, trained) runs, for showing what the loss covers."""
        out: list[tuple[str, bool]] = []
        start = 0
        for i in range(1, len(encoded.input_ids) + 1):
            if i == len(encoded.input_ids) or (encoded.labels[i] != IGNORE) != (encoded.labels[start] != IGNORE):
                text = self.tokenizer.decode(encoded.input_ids[start:i], skip_special_tokens=False)
                out.append((text, encoded.labels[start] != IGNORE))
                start = i
        return out


def length_histogram(lengths: list[int], max_len: int) -> list[dict[str, Any]]:
    """Counts of examples by token length (before truncation), in bins that double (up to 16, 32, 64 …) with
    `max_len` as an edge when anything is longer, so the bins beyond it are exactly what gets cut."""
    if not lengths:
        return []
    longest = max(lengths)
    edges, edge = [], 16
    while True:
        edges.append(edge)
        if edge >= longest:
            break
        edge *= 2
    if max_len < longest:
        edges = sorted(set(edges) | {max_len})
    bins, low = [], -1
    for edge in edges:
        bins.append({"min": low + 1, "max": edge, "count": sum(low < n <= edge for n in lengths), "overMaxSeqLen": edge > max_len})
        low = edge
    return bins
