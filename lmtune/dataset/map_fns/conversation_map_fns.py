"""Multi-turn formats: lists of role-tagged messages (ShareGPT, OpenAI) and oasst1's marked-up text.

All of them go through one set of rules (:class:`Rounds`), so a conversation reads the same
whichever format it came in:

* ``system`` text applies to the next round (several system messages in a row are joined by
  a newline); a round carries ``'system'`` only when there is some.
* Consecutive messages of the same side are merged, joined by a newline: several user messages
  form one input, several assistant messages one output.
* A tool result (role ``tool``, ``function``, ``observation`` or ``ipython``) is folded into the
  next round's input, exactly like a user message and joined to it by a newline. So
  ``user -> assistant (calls a tool) -> tool -> assistant`` gives two rounds: (user text, the
  call) and (the tool's result, the answer). Tool results carry no marker of their own: the
  data's text is used as it is.
* Assistant messages before the first user or tool message are dropped (nothing asked them), and
  so is a final user or tool message with no answer (it would never be trained).
* An assistant message flagged ``loss: false`` (or ``weight: 0``) is kept as context but not
  trained (``output_with_loss: False``). When merged assistant messages disagree, the merged
  output is trained only if all of them were.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator

from lmtune.core.errors import ConfigError
from lmtune.dataset.map_fns._common import _as_text, _join, _require_any, _text

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "bot", "model", "chatgpt"})
SYSTEM_ROLES = frozenset({"system"})
TOOL_ROLES = frozenset({"tool", "function", "observation", "ipython"})
_ROLE_KIND = {
    role: kind
    for kind, roles in (("user", USER_ROLES), ("assistant", ASSISTANT_ROLES), ("system", SYSTEM_ROLES),
                        ("tool", TOOL_ROLES))
    for role in roles
}
_KNOWN_ROLES = sorted(_ROLE_KIND)


class Rounds:
    """Collects messages in order and groups them into lmtune's conversation rounds."""

    def __init__(self) -> None:
        self.conversation: list[dict] = []
        self._system: list[str] = []
        self._input: list[str] = []
        self._asked = False  # a user or tool message is waiting for an answer

    def system(self, text: str) -> None:
        self._system.append(text)

    def user(self, text: str) -> None:
        """A user message or a tool result: both become the next round's input."""
        self._input.append(text)
        self._asked = True

    def answer(self, text: str, trained: bool = True) -> None:
        if self._asked:
            turn = {"input": _join(self._input), "output": text}
            system = _join(self._system)
            if system:
                turn["system"] = system
            if not trained:
                turn["output_with_loss"] = False
            self.conversation.append(turn)
            self._system, self._input, self._asked = [], [], False
        elif self.conversation:  # another assistant message right after an answer: same output
            last = self.conversation[-1]
            last["output"] = _join([last["output"], text])
            if not trained:
                last["output_with_loss"] = False
        # else: an answer before any question, dropped

    def result(self) -> dict:
        return {"conversation": self.conversation}


def load_message_list(example: dict, keys: tuple[str, ...], fmt: str) -> tuple[str, list]:
    """The message list under the first of ``keys`` present; a JSON or Python-literal string is parsed."""
    field, messages = _require_any(example, keys, fmt)
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            try:
                messages = ast.literal_eval(messages)
            except (ValueError, SyntaxError):
                raise ConfigError(
                    f"field {field!r} is a string that is neither JSON nor a Python literal, in a row "
                    f"for {fmt}; it should be a list of messages"
                ) from None
    if not isinstance(messages, (list, tuple)):
        raise ConfigError(f"field {field!r} is a {type(messages).__name__}, not a list of messages, "
                          f"in a row for {fmt}")
    return field, list(messages)


def _message_content(message: dict, where: str, fmt: str) -> str:
    if "value" not in message and "content" not in message:
        raise ConfigError(f"{where} has no 'value' (or 'content') field, which {fmt} needs "
                          f"(message fields: {sorted(message)})")
    value = message.get("value")
    if value is None:
        value = message.get("content")
    if value is None:  # Arrow fills a key that other messages have with None
        return ""
    if isinstance(value, list):  # OpenAI content parts: text only
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and part.get("text") is not None:
                texts.append(_as_text(part["text"], f"a text part of {where}", fmt))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ConfigError(f"{where} has a content part of type {kind!r}; {fmt} handles text only")
        return "".join(texts)
    if isinstance(value, dict):  # a structured tool result
        return json.dumps(value, ensure_ascii=False)
    return _as_text(value, f"the content of {where}", fmt)


def _trained(message: dict, where: str, fmt: str) -> bool:
    """The message's ``loss`` (or ``weight``) flag; absent means trained."""
    for key in ("loss", "weight"):
        value = message.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            word = value.strip().lower()
            if word in ("true", "1", "yes"):
                return True
            if word in ("false", "0", "no"):
                return False
        elif isinstance(value, (bool, int, float)):
            return bool(value)
        raise ConfigError(f"{where} has {key}={value!r}; use true/false (or 1/0)")
    return True


def iter_messages(messages: list, field: str, fmt: str) -> Iterator[tuple[str, str, str, dict]]:
    """``(kind, content, where, message)`` for each message; ``kind`` is user, assistant, system or tool.

    The role is read from ``from`` or ``role``, the text from ``value`` or ``content``.
    """
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise ConfigError(f"{where} is a {type(message).__name__}, not a message dict, in a row for {fmt}")
        role = message.get("from")
        if role is None:
            role = message.get("role")
        if role is None:
            raise ConfigError(f"{where} has no 'from' (or 'role') field, which {fmt} needs "
                              f"(message fields: {sorted(message)})")
        role = str(role).strip().lower()
        kind = _ROLE_KIND.get(role)
        if kind is None:
            raise ConfigError(f"{where} has role {role!r}, which {fmt} does not know; "
                              f"known roles: {', '.join(_KNOWN_ROLES)}")
        yield kind, _message_content(message, where, fmt), where, message


def messages_to_rounds(messages: list, field: str, fmt: str) -> Rounds:
    """Role-tagged messages grouped into rounds (the rules are in this module's docstring)."""
    rounds = Rounds()
    for kind, content, where, message in iter_messages(messages, field, fmt):
        if kind in ("user", "tool"):
            rounds.user(content)
        elif kind == "system":
            rounds.system(content)
        else:
            if not content and (message.get("tool_calls") or message.get("function_call")):
                raise ConfigError(f"{where} is an assistant message with tool calls and no text; {fmt} "
                                  "does not render tool calls: write a map function that puts them into "
                                  "the text in your model's format")
            rounds.answer(content, _trained(message, where, fmt))
    return rounds


def sharegpt_map_fn(example: dict) -> dict:
    """ShareGPT-style ``conversations`` (or ``messages``): a list of messages, multi-turn.

    Each message has its role under ``from`` or ``role`` and its text under ``value`` or
    ``content``. Roles: ``human``/``user``; ``gpt``/``assistant``/``bot``/``model``/``chatgpt``;
    ``system``; ``tool``/``function``/``observation``/``ipython`` (a tool result, folded into the
    next round's input). The rules for merging and dropping are in this module's docstring.
    """
    field, messages = load_message_list(example, ("conversations", "messages"), "sharegpt_map_fn")
    return messages_to_rounds(messages, field, "sharegpt_map_fn").result()


def wizardlm_map_fn(example: dict) -> dict:
    """WizardLM evol-instruct: ShareGPT ``conversations`` with ``from`` human/gpt and ``value``."""
    field, messages = load_message_list(example, ("conversations",), "wizardlm_map_fn")
    return messages_to_rounds(messages, field, "wizardlm_map_fn").result()


def openai_map_fn(example: dict) -> dict:
    """OpenAI chat ``messages`` (``role`` system/user/assistant, ``content``), multi-turn.

    An assistant message may carry ``loss: false`` (a bool or the string ``"false"``) to keep it
    out of the loss. Tool messages are folded into the next input as in :func:`sharegpt_map_fn`.
    """
    field, messages = load_message_list(example, ("messages",), "openai_map_fn")
    return messages_to_rounds(messages, field, "openai_map_fn").result()


_OASST1_TURN = re.compile(r"###\s*(Human|Assistant):")


def oasst1_map_fn(example: dict) -> dict:
    """openassistant-guanaco ``text``: ``### Human: ...### Assistant: ...``, multi-turn.

    Text before the first marker is ignored; a trailing human turn without an answer is dropped.
    """
    pieces = _OASST1_TURN.split(_text(example, "text", "oasst1_map_fn"))
    rounds = Rounds()
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        if marker == "Human":
            rounds.user(content.strip())
        else:
            rounds.answer(content.strip())
    return rounds.result()
