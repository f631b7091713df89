"""Tool calling: OpenAI `tools` / `tool_choice` in, OpenAI `tool_calls` out.

Calls are written in Hermes' format, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
and generated under a grammar (upg_backend.grammar), as llama-cpp-python's function-calling chat
handlers do: `required` and a named function force one or more calls whose arguments match the
tool's JSON schema; `auto` lets the model write text, and constrains a call once it begins one;
`none` generates text.

Templates that know tools (they read `tools`) get the tools and the messages as transformers passes
them. For templates that do not (Phi-4's), `render_messages` does what llama-cpp-python's
chatml-function-calling handler does for a model: a system message lists the functions and the
call format, assistant calls are written out in that format, and tool results become user turns
(`<tool_response>`, as Qwen's template writes them).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Mapping, Sequence

from llguidance import StructTag

from .grammar import JSON_OPTIONS, Grammar, closed_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\n(.*?)\n" + re.escape(CLOSE), re.S)


def _function(tool: Any) -> Mapping[str, Any]:
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or \
            not isinstance(tool.get("function"), Mapping) or not isinstance(tool["function"].get("name"), str):
        raise ValueError(f"each tool must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                         f"got {tool!r}")
    return tool["function"]


class ToolChoice:
    """What the model may or must call, and the grammar that holds it to that.

    Args:
        tools: OpenAI tool definitions (`{"type": "function", "function": {"name", "description",
            "parameters"}}`).
        tool_choice: "auto" (default with tools), "none", "required", a function name, or
            `{"type": "function", "function": {"name": ...}}`.
        special_open: whether `<tool_call>` is one token of the vocabulary.

    Raises:
        ValueError: bad tools, an unknown tool_choice or a function that is not among the tools.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]], tool_choice: Any = None, special_open: bool = False):
        if not isinstance(tools, (list, tuple)):
            raise ValueError("tools must be a list")
        self.functions = {f["name"]: f for f in map(_function, tools)}
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, Mapping):
            name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), Mapping) else None
            if not isinstance(name, str):
                raise ValueError(f"tool_choice must name a function as {{'type': 'function', 'function': {{'name': ...}}}}, "
                                 f"got {choice!r}")
            choice = name
        if not isinstance(choice, str):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}")
        if choice not in ("auto", "none", "required") and choice not in self.functions:
            raise ValueError(f"tool_choice names {choice!r}, which is not among the tools "
                             f"({', '.join(self.functions) or 'none'})")
        if choice in ("auto", "required") and not self.functions:
            choice = "none"
        self.choice = choice
        self._special_open = special_open

    def _call_schema(self, name: str) -> dict[str, Any]:
        params = closed_schema(self.functions[name].get("parameters") or {"type": "object"})
        return {"x-guidance": JSON_OPTIONS, "type": "object", "additionalProperties": False,
                "properties": {"name": {"const": name}, "arguments": params}, "required": ["name", "arguments"]}

    def grammar(self) -> Grammar | None:
        """The grammar generation runs under (None: free text)."""
        if self.choice == "none":
            return None
        if self.choice == "auto":
            tags = [StructTag(trigger=OPEN, begin=OPEN + "\n", grammar=self._call_schema(n), end="\n" + CLOSE)
                    for n in self.functions]
            return Grammar.from_lark(StructTag.to_grammar(tags, assume_special=self._special_open))
        names = list(self.functions) if self.choice == "required" else [self.choice]
        rules = [f"fn_{i}: %json {json.dumps(self._call_schema(n))}" for i, n in enumerate(names)]
        body = " | ".join(f"fn_{i}" for i in range(len(names)))
        repeat = ' ("\\n" call)*' if self.choice == "required" else ""
        return Grammar.from_lark("\n".join([f"start: call{repeat}",
                                            f"call: {json.dumps(OPEN + chr(10))} ({body}) {json.dumps(chr(10) + CLOSE)}",
                                            *rules]))

    def system_prompt(self) -> str:
        """The text that tells a model without a tool-aware template what it can call and how."""
        lines = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                          for f in self.functions.values())
        return ("You can call functions. Their signatures, as JSON schemas:\n<tools>\n" + lines + "\n</tools>\n"
                "To call one, answer with\n" + OPEN + '\n{"name": <function name>, "arguments": <arguments as JSON>}\n'
                + CLOSE + "\nonce for each call.")


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) of generated text: each well-formed call block becomes a call;
    the text around them is the content (None when empty)."""
    calls = []
    for m in _CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
    content = _CALL.sub("", text).strip() if calls else text
    return (content or None), calls


def _call_text(call: Mapping[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        pass  # written as the client sent it
    return f"{OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def render_messages(messages: Sequence[Mapping[str, Any]], tools: ToolChoice | None) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: calls and results written as text, the
    tool list in the (first) system message."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            text = "\n".join(_call_text(c) for c in m.pop("tool_calls"))
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools is not None and tools.functions:
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{tools.system_prompt()}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": tools.system_prompt()})
    return out
