"""Function calling on the chat route, where `tool_choice` forces a call.

PhiMoE's and JetMoE's chat templates define no tool-call format, so there is nothing to parse out of
free text ("auto"). What the server can do for any model is to hold the output to the call's JSON
(the grammar of `response_format`), as other servers do for a forced choice:

- `tool_choice: {"type": "function", "function": {"name": f}}`: the output is f's arguments, an
  object that its `parameters` schema describes; one call.
- `tool_choice: "required"`: a JSON array of `{"name": ..., "arguments": {...}}`, each item one of
  the tools with its own schema; `parallel_tool_calls: false` allows one item.
- `"none"` (the default without tools): no call. `"auto"` (OpenAI's default with tools) is refused,
  naming the two choices that work.

`tools` also go to the chat template (`apply_chat_template(..., tools=)`), for templates that
render them. The calls come back as OpenAI's `tool_calls`, with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass
class ToolCalls:
    """A forced tool choice: the JSON Schema the output is held to, and how to read it back."""

    schema: dict
    named: str | None  # the forced function, or None for "required" (an array of calls)

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI's `tool_calls` from the output, or None where it is not the whole JSON (cut by
        max_tokens or a stop string). Numbers keep the model's digits (a float past the double
        range would otherwise come back as `Infinity`, which is no JSON)."""
        try:
            value = json.loads(text, parse_float=_Number, parse_int=_Number)
        except ValueError:
            return None
        items = [{"name": self.named, "arguments": value}] if self.named is not None else value
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": item["name"], "arguments": _dumps(item["arguments"])}}
                for item in items]


class _Number(str):
    """A JSON number as the output wrote it."""


def _dumps(value: Any) -> str:
    """JSON of a value read with `_Number`s, as `json.dumps` writes it otherwise."""
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def tools_of(tools: list[dict[str, Any]] | None) -> dict[str, dict]:
    """`tools`, checked: {name: its parameters' JSON Schema}."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise BadRequest(f"{where}.type must be 'function', got {kind!r}", where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadRequest(f"{where}.function must be an object with a name", f"{where}.function")
        unknown = set(tool) - {"type", "function"} or set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise BadRequest(f"{where}: unknown field(s) {sorted(unknown)}", where)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequest(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                             f"{where}.function.name")
        if name in out:
            raise BadRequest(f"{where}.function.name: {name!r} is given twice", f"{where}.function.name")
        params = fn.get("parameters", NO_ARGUMENTS)
        if not isinstance(params, dict):
            raise BadRequest(f"{where}.function.parameters must be a JSON Schema object",
                             f"{where}.function.parameters")
        if params.get("type", "object") != "object":
            raise BadRequest(f"{where}.function.parameters must describe an object (the call's arguments), got "
                             f"type {params['type']!r}", f"{where}.function.parameters")
        # the arguments are an object, as OpenAI's always are: `{}` (a function of no arguments) too
        out[name] = {**NO_ARGUMENTS, **params} if params else NO_ARGUMENTS
    return out


def forced_calls(tools: list[dict[str, Any]] | None, tool_choice, parallel: bool | None) -> ToolCalls | None:
    """The forced choice of a chat request (None: no call)."""
    schemas = tools_of(tools)
    choice = tool_choice if tool_choice is not None else ("auto" if schemas else "none")
    if choice == "none":
        return None
    if not schemas:
        raise BadRequest(f"tool_choice {choice!r} needs tools", "tool_choice")
    if choice == "auto":
        raise BadRequest("tool_choice 'auto' (the default with tools) is not supported: this model's chat format "
                         "defines no tool calls to read out of free text. Pass tool_choice='required', or "
                         "{'type': 'function', 'function': {'name': ...}}, to have the output be the call",
                         "tool_choice")
    if choice == "required":
        # each tool's schema keeps its own base ($id), so that its "#/$defs/..." references resolve in it
        items = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": name},
                                 "arguments": {"$id": f"urn:moetorch:tool:{name}", **params}}}
                 for name, params in schemas.items()]
        array = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if parallel is False:
            array["maxItems"] = 1
        return ToolCalls(array, None)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in schemas:
            raise BadRequest(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"{sorted(schemas)}", "tool_choice")
        return ToolCalls(schemas[name], name)
    raise BadRequest(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}, got {choice!r}", "tool_choice")
