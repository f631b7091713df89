"""JSON output constraints: a prefix validator for JSON, optionally shaped by a JSON schema.

While sampling, the runtime asks whether `output + token bytes` can still grow into a valid
document (`accepts`) and masks every token that cannot. The validator re-parses the short output
from the start each time; a recursive-descent parser that reports "ran out of input" separately
from "invalid" is all it takes.

Schema subset: `type` (one or a list), `properties` / `required` / `additionalProperties`,
`items` / `minItems` / `maxItems`, `enum`, `const`, `anyOf` / `oneOf`, `$ref` into `$defs` or
`definitions`, `maxLength`. Other keywords are not enforced. Whitespace between tokens is one
space, or one newline and an indent of at most _MAX_INDENT, so a model cannot stall in whitespace.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

_MAX_INDENT = 20
_MAX_NUMBER = 24
_ESCAPES = b'"\\/bfnrt'
_DIGITS = b"0123456789"


class _Incomplete(Exception):
    """The input ended where more could follow: a valid prefix."""


class _Invalid(Exception):
    """No continuation of the input is valid."""


def _at(s: bytes, i: int) -> int:
    if i >= len(s):
        raise _Incomplete
    return s[i]


class _Parser:
    def __init__(self, root: Mapping[str, Any]):
        self.root = root

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/") or seen > 32:
                raise ValueError(f"unsupported $ref {ref!r} (only local '#/...' references)")
            node: Any = self.root
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            schema, seen = node, seen + 1
        return schema

    def space(self, s: bytes, i: int) -> int:
        # as llama.cpp's JSON grammar: nothing, one space, or a newline and up to _MAX_INDENT spaces or tabs
        if i < len(s) and s[i] == ord(" "):
            return i + 1
        if i < len(s) and s[i] == ord("\n"):
            i += 1
            start = i
            while i < len(s) and s[i] in b" \t":
                i += 1
                if i - start > _MAX_INDENT:
                    raise _Invalid
        return i

    def value(self, s: bytes, i: int, schema: Mapping[str, Any]) -> int:
        schema = self.resolve(schema)
        if "const" in schema or "enum" in schema:
            return self.literal(s, i, [schema["const"]] if "const" in schema else schema["enum"])
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return self.any_of(s, i, alternatives)
        types = schema.get("type")
        types = [types] if isinstance(types, str) else list(types or [])
        c = _at(s, i)
        if c == ord("{") and (not types or "object" in types):
            return self.object(s, i, schema)
        if c == ord("[") and (not types or "array" in types):
            return self.array(s, i, schema)
        if c == ord('"') and (not types or "string" in types):
            return self.string(s, i, schema.get("maxLength"))
        if (c == ord("-") or c in _DIGITS) and (not types or {"number", "integer"} & set(types)):
            return self.number(s, i, integer="number" not in types and "integer" in types)
        for word, kind in ((b"true", "boolean"), (b"false", "boolean"), (b"null", "null")):
            if c == word[0] and (not types or kind in types):
                return self.literal_bytes(s, i, word)
        raise _Invalid

    def any_of(self, s: bytes, i: int, alternatives: list) -> int:
        incomplete = False
        for alt in alternatives:
            try:
                return self.value(s, i, alt)
            except _Incomplete:
                incomplete = True
            except _Invalid:
                pass
        raise _Incomplete if incomplete else _Invalid

    def literal(self, s: bytes, i: int, options: list) -> int:
        incomplete = False
        for option in options:
            text = json.dumps(option, ensure_ascii=False).encode("utf-8")
            if s.startswith(text, i):
                return i + len(text)
            if text.startswith(s[i:]):
                incomplete = True
        raise _Incomplete if incomplete else _Invalid

    def literal_bytes(self, s: bytes, i: int, word: bytes) -> int:
        if s.startswith(word, i):
            return i + len(word)
        if word.startswith(s[i:]):
            raise _Incomplete
        raise _Invalid

    def string(self, s: bytes, i: int, max_length: int | None = None) -> int:
        i += 1  # the opening quote
        n = 0
        while True:
            c = _at(s, i)
            if c == ord('"'):
                return i + 1
            if c < 0x20:
                raise _Invalid
            if c == ord("\\"):
                e = _at(s, i + 1)
                if e == ord("u"):
                    for k in range(4):
                        if chr(_at(s, i + 2 + k)) not in "0123456789abcdefABCDEF":
                            raise _Invalid
                    i += 6
                elif e in _ESCAPES:
                    i += 2
                else:
                    raise _Invalid
            else:
                i += 1
            if c & 0xC0 != 0x80:  # count characters, not UTF-8 continuation bytes
                n += 1
            if max_length is not None and n > max_length:
                raise _Invalid

    def number(self, s: bytes, i: int, integer: bool) -> int:
        start = i
        if s[i] == ord("-"):
            i += 1
        c = _at(s, i)
        if c == ord("0"):
            i += 1
        elif c in _DIGITS:
            while i < len(s) and s[i] in _DIGITS:
                i += 1
        else:
            raise _Invalid
        if not integer and i < len(s) and s[i] == ord("."):
            i += 1
            if _at(s, i) not in _DIGITS:
                raise _Invalid
            while i < len(s) and s[i] in _DIGITS:
                i += 1
        if not integer and i < len(s) and s[i] in b"eE":
            i += 1
            if _at(s, i) in b"+-":
                i += 1
            if _at(s, i) not in _DIGITS:
                raise _Invalid
            while i < len(s) and s[i] in _DIGITS:
                i += 1
        if i - start > _MAX_NUMBER:
            raise _Invalid
        return i

    def object(self, s: bytes, i: int, schema: Mapping[str, Any]) -> int:
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        extra = schema.get("additionalProperties", not props)
        seen: set[str] = set()
        i = self.space(s, i + 1)
        if _at(s, i) == ord("}"):
            if required:
                raise _Invalid
            return i + 1
        while True:
            if _at(s, i) != ord('"'):
                raise _Invalid
            try:
                end = self.string(s, i)
            except _Incomplete:  # a partial key must begin some allowed, unused key
                partial = s[i:]
                if extra is False and not any(json.dumps(k, ensure_ascii=False).encode().startswith(partial)
                                              for k in props if k not in seen):
                    raise _Invalid from None
                raise
            key = json.loads(s[i:end].decode("utf-8", errors="replace"))
            if key in seen or (extra is False and key not in props):
                raise _Invalid
            seen.add(key)
            i = self.space(s, end)
            if _at(s, i) != ord(":"):
                raise _Invalid
            i = self.space(s, i + 1)
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            i = self.space(s, self.value(s, i, sub))
            c = _at(s, i)
            if c == ord("}"):
                if not required <= seen:
                    raise _Invalid
                return i + 1
            if c != ord(",") or (extra is False and not set(props) - seen):
                raise _Invalid
            i = self.space(s, i + 1)

    def array(self, s: bytes, i: int, schema: Mapping[str, Any]) -> int:
        items = schema.get("items") or {}
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        i = self.space(s, i + 1)
        if _at(s, i) == ord("]"):
            if lo > 0:
                raise _Invalid
            return i + 1
        n = 0
        while True:
            i = self.space(s, self.value(s, i, items))
            n += 1
            c = _at(s, i)
            if c == ord("]"):
                if n < lo:
                    raise _Invalid
                return i + 1
            if c != ord(",") or (hi is not None and n >= hi):
                raise _Invalid
            i = self.space(s, i + 1)


class JsonConstraint:
    """Constrains output to one JSON value (an object unless the schema says otherwise).

    Args:
        schema: a JSON schema (subset in the module docstring); None: any JSON object.

    Raises:
        ValueError: the schema is not a JSON object.
    """

    def __init__(self, schema: Mapping[str, Any] | None = None):
        if schema is not None and not isinstance(schema, Mapping):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        self.schema = {"type": "object"} if schema is None else dict(schema)
        self._parser = _Parser(self.schema)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> JsonConstraint | None:
        """The constraint an OpenAI / llama-cpp-python `response_format` asks for (None: no constraint).

        Accepts `{"type": "text"}`, `{"type": "json_object"}` with an optional `"schema"`, and
        `{"type": "json_schema", "json_schema": {"schema": ...}}`.

        Raises:
            ValueError: an unknown response format.
        """
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(response_format.get("schema"))
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            if "schema" not in spec:
                raise ValueError("response_format json_schema needs json_schema.schema")
            return cls(spec["schema"])
        raise ValueError(f"unknown response_format type {kind!r}; use 'text', 'json_object' or 'json_schema'")

    def _check(self, data: bytes) -> str:
        try:
            end = self._parser.space(data, self._parser.value(data, 0, self.schema))
        except _Incomplete:
            return "partial"
        except (_Invalid, RecursionError):
            return "invalid"
        return "complete" if end == len(data) else "invalid"

    def accepts(self, data: bytes) -> bool:
        """Whether `data` is valid so far: a complete value, or a prefix of one."""
        return self._check(data) != "invalid"

    def complete(self, data: bytes) -> bool:
        """Whether `data` is a complete value that matches the schema."""
        return self._check(data) == "complete"

    def finished(self, data: bytes) -> bool:
        """Whether `data` is complete and nothing may follow (objects, arrays, strings and literals
        end themselves; a number could still grow)."""
        return self.complete(data) and data.rstrip()[-1:] in (b"}", b"]", b'"', b"e", b"l")
