"""MSAgent-Bench (ModelScope agent dialogues) rewritten in the ReAct tool-use format.

A row is ``{'conversations': [{'from': 'system' | 'user' | 'assistant', 'value': str}, ...]}``;
``conversations`` may also be that list written as a JSON or Python-literal string. The system
message declares the tools as JSON objects with ``name``, ``description`` and
``paths[0].parameters`` (each with ``name`` and ``description``). An assistant message is a
trajectory: free text, tool calls as ``<|startofthink|>```JSON {"api_name": ..., "parameters":
{...}}```<|endofthink|>``, tool results as ``<|startofexec|>```JSON {...}```<|endofexec|>``, and
the final reply after the last one.

Each assistant message becomes rounds in the ReAct format:

* a tool call is an output ``Thought: <the free text before it>`` (when there is any),
  ``Action: <api_name>``, ``Action Input: <parameters as JSON>``;
* its result is the next round's input, ``Response: <result as JSON>``, which is how lmtune
  passes tool results everywhere (the model reads them, it is not trained on them);
* the text after the last tool result is the output ``Final Answer: <text>``; a message with no
  tool call is a final answer as a whole. A result with no text after it waits, as input, for
  the next user message.

The system message is replaced by :data:`REACT_SYSTEM`, which lists the declared tools and the
format. A row whose tool call is not valid JSON (or names no ``api_name``) is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmtune.dataset.map_fns._common import _join
from lmtune.dataset.map_fns.conversation_map_fns import Rounds, iter_messages, load_message_list

REACT_SYSTEM = (
    "You are an assistant that can call external tools. These are the tools you can use:\n"
    "{tools}\n"
    "To call a tool, reply in this form:\n"
    "Thought: what this step has to solve, and why a tool helps\n"
    "Action: the tool's name, one of [{names}]\n"
    "Action Input: the tool's arguments as JSON\n"
    "The tool's result then comes back as:\n"
    "Response: the result\n"
    "When you know the answer, or need no tool, reply:\n"
    "Final Answer: the answer"
)

_SEGMENT = re.compile(r"<\|startof(think|exec)\|>(.*?)<\|endof\1\|>", re.DOTALL)
_FENCE = re.compile(r"^\s*```(?:json)?|```\s*$", re.IGNORECASE)


class _BadCall(Exception):
    """A tool call that cannot be read; the row is dropped."""


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(_FENCE.sub("", text).strip(), strict=False)
    except ValueError:
        return None


def _declared_tools(text: str) -> dict[str, str]:
    """Tool name -> its description (and parameters), from every JSON object with a name and description."""
    decoder = json.JSONDecoder(strict=False)
    tools: dict[str, str] = {}
    start = text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            obj, end = None, start + 1
        if isinstance(obj, dict) and "name" in obj and "description" in obj:
            tools[str(obj["name"])] = str(obj["description"]) + _parameters(obj)
        else:
            end = start + 1  # look for a tool declaration inside this object
        start = text.find("{", end)
    return tools


def _parameters(tool: dict) -> str:
    paths = tool.get("paths")
    if not (isinstance(paths, list) and paths and isinstance(paths[0], dict)):
        return ""
    params = {
        str(p["name"]): p.get("description", "")
        for p in paths[0].get("parameters") or []
        if isinstance(p, dict) and "name" in p
    }
    return f" Parameters: {json.dumps(params, ensure_ascii=False)}" if params else ""


def _react_system(declaration: str) -> str:
    tools = _declared_tools(declaration)
    listing = "\n".join(f"- {name}: {description}" for name, description in tools.items()) or "(none)"
    return REACT_SYSTEM.format(tools=listing, names=", ".join(tools))


def _add_trajectory(rounds: Rounds, value: str) -> None:
    """One assistant message, as ReAct rounds (see the module docstring)."""
    output: list[str] = []
    text: list[str] = []  # free text since the last tool call
    called = False
    position = 0
    for segment in _SEGMENT.finditer(value):
        text.append(value[position:segment.start()].strip())
        position = segment.end()
        if segment.group(1) == "think":
            call = _json_or_none(segment.group(2))
            if not isinstance(call, dict) or call.get("api_name") is None:
                raise _BadCall
            thought = _join(text)
            if thought:
                output.append(f"Thought: {thought}")
            output.append(f"Action: {call['api_name']}")
            output.append(f"Action Input: {json.dumps(call.get('parameters') or {}, ensure_ascii=False)}")
            text, called = [], True
        else:
            result = _json_or_none(segment.group(2))
            response = _FENCE.sub("", segment.group(2)).strip() if result is None else json.dumps(
                result, ensure_ascii=False)
            if output:
                rounds.answer("\n".join(output))
                output = []
            rounds.user(f"Response: {response}")
    text.append(value[position:].strip())
    final = _join(text)
    if final or not called:
        output.append(f"Final Answer: {final}".rstrip())
    if output:
        rounds.answer("\n".join(output))


def msagent_react_map_fn(example: dict) -> dict:
    """MSAgent-Bench ``conversations`` (tool-use dialogues) -> rounds in the ReAct format.

    Outputs are ``Thought:``/``Action:``/``Action Input:`` or ``Final Answer:`` lines and tool
    results come back as ``Response:`` inputs; the module docstring has the details.
    """
    field, messages = load_message_list(example, ("conversations",), "msagent_react_map_fn")
    rounds = Rounds()
    try:
        for kind, content, _, _ in iter_messages(messages, field, "msagent_react_map_fn"):
            if kind == "system":
                rounds.system(_react_system(content))
            elif kind == "assistant":
                _add_trajectory(rounds, content)
            else:
                rounds.user(content)
    except _BadCall:
        return {"conversation": []}
    return rounds.result()
