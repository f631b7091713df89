"""llama-cpp-python's `LlamaGrammar`: GBNF grammars, enforced by llguidance (upg_backend.grammar)."""
from __future__ import annotations

import json
import os
from typing import Any

from ..grammar import Grammar


class LlamaGrammar(Grammar):
    """A GBNF grammar for `grammar=` (llama-cpp-python's constructors; `verbose` is accepted)."""

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        """A grammar from GBNF text (`root ::= ...`). ValueError names what is wrong and where."""
        return cls.from_gbnf(grammar)

    @classmethod
    def from_file(cls, file: str | os.PathLike, verbose: bool = True) -> LlamaGrammar:
        """A grammar from a .gbnf file."""
        with open(file, encoding="utf-8") as f:
            return cls.from_gbnf(f.read())

    @classmethod
    def from_json_schema(cls, json_schema: str | dict[str, Any], verbose: bool = True) -> LlamaGrammar:
        """A grammar for JSON that matches the schema (a JSON string, as llama-cpp-python takes it, or a dict)."""
        return super().from_json_schema(json.loads(json_schema) if isinstance(json_schema, str) else json_schema)
