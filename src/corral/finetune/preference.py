"""Preference data for `method: dpo | orpo`: a prompt, the answer preferred (`chosen`) and the one not (`rejected`).

Recognised per example, in the shapes TRL and LLaMA-Factory take:

- flat strings: `{"prompt": "...", "chosen": "...", "rejected": "..."}` (no chat template: raw text);
- message lists (OpenAI `role`/`content` or ShareGPT `from`/`value`): `prompt` (or ShareGPT `conversations`, with
  an optional `system`) the turns before the answer, `chosen` and `rejected` each the assistant's answer as a list of
  one message or one message; or, without a prompt, `chosen` and `rejected` whole conversations that share every
  turn but their last (TRL's implicit prompt).

Normalised to TRL's conversational or standard format (`Preference.for_trl`). Pure: no tokenizer, no I/O. A malformed
example raises InvalidInput naming the dataset line and what to fix, as `corral.finetune.formats` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.domain.errors import InvalidInput
from corral.finetune.formats import ROLE_ALIASES, SHAREGPT_ROLES, Conversation, Example, Text

PREFERENCE_TEXT, PREFERENCE_MESSAGES = "preference-text", "preference-messages"
NEEDS = ("needs 'chosen' and 'rejected' (the preferred and the other answer) with a 'prompt' (or ShareGPT "
         "'conversations'): strings, or message lists; or 'chosen' and 'rejected' conversations that differ in their "
         "last (assistant) turn only")
PROMPT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Preference:
    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def chat(self) -> bool:
        """Whether it goes through the chat template (message lists) or is raw text (strings)."""
        return isinstance(self.prompt, list)

    @property
    def format(self) -> str:
        return PREFERENCE_MESSAGES if self.chat else PREFERENCE_TEXT

    def side(self, answer: str = "chosen") -> Example:
        """The prompt with one of the answers, as an SFT example whose answer is the trained part: what the preview
        shows and counts (the tokens each side of a pair puts through the model)."""
        reply = self.chosen if answer == "chosen" else self.rejected
        if isinstance(self.prompt, list) and isinstance(reply, list):
            return Conversation([*self.prompt, *reply], [False] * len(self.prompt) + [True] * len(reply), format=self.format)
        return Text(str(self.prompt), str(reply), format=self.format)

    def for_trl(self) -> dict[str, Any]:
        """The record as TRL's DPO and ORPO trainers take it (conversational when chat, else standard)."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def parse_preference(record: Any, line: int) -> Preference:
    where = f"dataset line {line}"
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise InvalidInput(f"{where}: {NEEDS}")
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt", record.get("conversations"))
    if isinstance(chosen, str) or isinstance(rejected, str):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput(f"{where}: flat 'chosen' and 'rejected' strings need a 'prompt' string")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"{where}: '{key}' must be a non-empty string, as the other answer is")
        if chosen == rejected:
            raise InvalidInput(f"{where}: 'chosen' and 'rejected' are the same answer: nothing to prefer")
        return Preference(prompt, chosen, rejected)
    chosen_turns = _messages(chosen, "chosen", where)
    rejected_turns = _messages(rejected, "rejected", where)
    if prompt is None:  # whole conversations: the shared turns are the prompt, the last ones the answers
        if len(chosen_turns) < 2 or chosen_turns[:-1] != rejected_turns[:-1]:
            raise InvalidInput(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations that share "
                               "every turn but their last")
        prompt_turns, chosen_turns, rejected_turns = chosen_turns[:-1], chosen_turns[-1:], rejected_turns[-1:]
    else:
        key = "prompt" if "prompt" in record else "conversations"
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
        prompt_turns = _messages(prompt, key, where)
        if isinstance(record.get("system"), str) and record["system"].strip():
            prompt_turns = [{"role": "system", "content": record["system"]}, *prompt_turns]
    if prompt_turns[-1]["role"] != "user":
        raise InvalidInput(f"{where}: the prompt's last turn must be the user's (the answers reply to it), got "
                           f"'{prompt_turns[-1]['role']}'")
    for key, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise InvalidInput(f"{where}: '{key}' must be one assistant answer (or a conversation ending with it)")
    if chosen_turns == rejected_turns:
        raise InvalidInput(f"{where}: 'chosen' and 'rejected' are the same answer: nothing to prefer")
    return Preference(prompt_turns, chosen_turns, rejected_turns)


def _messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    """Messages as `{role, content}` (OpenAI's or ShareGPT's shape; one message alone is a list of one)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{where}: '{key}' must be a string or a non-empty list of messages")
    turns = []
    for i, message in enumerate(value):
        at = f"{where}: {key}[{i}]"
        if not isinstance(message, dict):
            raise InvalidInput(f"{at}: expected a message object")
        if "from" in message:
            role, content = SHAREGPT_ROLES.get(str(message["from"])), message.get("value")
        else:
            role, content = message.get("role"), message.get("content")
            role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
        if role not in PROMPT_ROLES:
            raise InvalidInput(f"{at}: the role must be one of system, user, assistant (ShareGPT: human, gpt, system), "
                               f"got '{str(message.get('from', message.get('role')))[:40]}'")
        if not isinstance(content, str) or not content.strip():
            raise InvalidInput(f"{at}: the content must be a non-empty string")
        turns.append({"role": role, "content": content})
    return turns
