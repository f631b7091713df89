"""Constrained sampling through llguidance: GBNF and Lark grammars, JSON schemas and tool calls.

A `Grammar` is compiled (and checked) once, independent of any model. Each generation makes a
`Matcher` over the model's token table: before a token is sampled it masks (-inf) every token the
grammar cannot take next, after it is sampled the matcher consumes it, and the generation ends
when the grammar allows nothing more. llguidance computes the mask over the whole vocabulary
(docs/API.md, "Constrained output", says what that costs per token).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import llguidance
import numpy as np

# llguidance's JSON output: separators as json.dumps writes them, no free whitespace (a model
# cannot stall in it)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed_schema(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists properties
    and says nothing of others, as llama.cpp's schema converter reads them (else a model may add
    keys without end)."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: closed_schema(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = closed_schema(out[key])
    if isinstance(out.get("properties"), Mapping) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Grammar:
    """A checked llguidance grammar (llama-cpp-python's `LlamaGrammar` wraps one).

    Build one with `from_gbnf`, `from_lark`, `from_json_schema` or `from_response_format`.

    Raises:
        ValueError: the grammar does not compile (the message says where).
    """

    def __init__(self, grammar: str, source: str = ""):
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise ValueError(f"bad grammar: {error}")
        self.grammar = grammar  # llguidance's serialized grammar
        self.source = source    # what it was made from, for messages

    @classmethod
    def from_gbnf(cls, text: str) -> Grammar:
        """A llama.cpp GBNF grammar (`root ::= ...`); Lark text is accepted too."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a grammar must be a non-empty string")
        try:
            return cls(llguidance.grammar_from("gbnf", text), text)
        except ValueError as e:  # conversion errors name the line and column
            raise ValueError(f"bad GBNF grammar: {e}") from None

    @classmethod
    def from_lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`start: ...`, `%json {...}`)."""
        return cls(llguidance.LLMatcher.grammar_from_lark(text), text)

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any]) -> Grammar:
        """One JSON value matching `schema` (llguidance's JSON-schema support: types, properties,
        required, additionalProperties, items, min/maxItems, enum, const, anyOf/oneOf/allOf, $ref,
        string lengths and patterns, formats, numeric bounds). An object that lists properties
        takes no others unless `additionalProperties` says so (as llama.cpp reads schemas)."""
        if not isinstance(schema, Mapping):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        text = json.dumps(closed_schema(schema))
        return cls(llguidance.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS), text)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> Grammar | None:
        """The grammar an OpenAI / llama-cpp-python `response_format` asks for (None: free text).

        `{"type": "json_object"}` is an object with at least one member (an empty `{}` answers
        nothing); `"schema"` beside it, or `{"type": "json_schema", "json_schema": {"schema": ...}}`,
        shapes it.

        Raises:
            ValueError: an unknown response format or a bad schema.
        """
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = response_format.get("schema")
            return cls.from_json_schema(schema if schema is not None else {"type": "object", "minProperties": 1})
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or "schema" not in spec:
                raise ValueError("response_format json_schema needs json_schema.schema")
            return cls.from_json_schema(spec["schema"])
        raise ValueError(f"unknown response_format type {kind!r}; use 'text', 'json_object' or 'json_schema'")


class TokenTable:
    """llguidance's view of one model's vocabulary (built once per model: it walks every token).

    Args:
        tokenizer_json: the model's tokenizer.json text.
        n_vocab: rows of the model's output (may exceed the tokenizer's vocabulary).
        eos_ids: the end-of-turn tokens, allowed once the grammar is satisfied.
    """

    def __init__(self, tokenizer_json: str, n_vocab: int, eos_ids: Sequence[int]):
        self.n_vocab = n_vocab
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos_ids) or None)


class Matcher:
    """A grammar's state during one generation."""

    def __init__(self, grammar: Grammar, table: TokenTable):
        self._m = llguidance.LLMatcher(table.tokenizer, grammar.grammar)
        self._n_vocab = table.n_vocab
        self._check()

    def _check(self) -> None:
        if self._m.is_error():
            raise ValueError(f"grammar: {self._m.get_error()}")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar cannot take next set to -inf."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self._n_vocab].astype(bool)
        self._check()
        if not allowed.any():
            raise ValueError("no token of this vocabulary can continue the constrained output")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def consume(self, token: int) -> None:
        self._m.consume_token(token)
        self._check()

    def finished(self) -> bool:
        """Whether the grammar allows nothing more (the output is complete)."""
        return self._m.is_stopped()
