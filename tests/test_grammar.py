"""Constrained sampling (llguidance): llama.cpp's own GBNF grammar examples and JSON schemas, on the
built-in model, with the output checked by outside references (json, re, a parser written from the
grammar's text)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from upg_backend.grammar import Grammar
from upg_backend.llama import Llama
from upg_backend.llama_cpp import LlamaGrammar

GRAMMARS = Path(__file__).parent / "data" / "grammars"
SEEDS = range(4)


@pytest.fixture(scope="module")
def llm():
    with Llama(n_ctx=512, n_threads=1) as llm:
        yield llm


def generate(llm, grammar, seed, prompt="Write something.", max_tokens=64, processors=None):
    out = llm.create_chat_completion([{"role": "user", "content": prompt}], grammar=grammar, max_tokens=max_tokens,
                                     temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                     logits_processor=processors)
    return out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]


def push_towards(llm, chars: bytes, by: float = 8.0):
    """A logits processor that favours tokens made only of `chars`: the tiny model then closes JSON
    strings and brackets, often where the grammar forbids it, so the mask has work to do."""
    ids = [t for t in range(llm.n_vocab()) if (b := llm.tokenizer.token_bytes(t)) and set(b) <= set(chars)]

    def process(input_ids, logits):
        logits[ids] += by
        return logits
    return [process]


def complete_lines(text, finished):
    """The lines of the output that the grammar has finished (all of them once generation stopped)."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" or not finished else lines


def test_json_gbnf_output_parses(llm):
    grammar = LlamaGrammar.from_file(GRAMMARS / "json.gbnf")
    finished = 0
    for seed in SEEDS:
        text, finish = generate(llm, grammar, seed, "Give me a JSON object.", max_tokens=96,
                                processors=push_towards(llm, b'"}], 0123456789'))
        assert text.startswith("{")
        if finish == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished  # at least one run reached the end of the grammar


def test_json_arr_gbnf_output_parses(llm):
    grammar = LlamaGrammar.from_string((GRAMMARS / "json_arr.gbnf").read_text())
    finished = 0
    for seed in SEEDS:
        text, finish = generate(llm, grammar, seed, "List some numbers as JSON.", max_tokens=96,
                                processors=push_towards(llm, b'"}], \n'))
        assert text.startswith("[\n")
        if finish == "stop":
            finished += 1
            assert isinstance(json.loads(text), list)
    assert finished


def test_list_gbnf(llm):
    grammar = LlamaGrammar.from_file(GRAMMARS / "list.gbnf")
    for seed in SEEDS:
        text, finish = generate(llm, grammar, seed, "List three capitals.", processors=push_towards(llm, b"\n", 12.0))
        lines = complete_lines(text, finish == "stop")
        assert lines and all(re.fullmatch(r"- [^\r\n\x0b\x0c\x85\u2028\u2029]+", line) for line in lines), text


MOVE = r"(?:(?:[a-h]x)?[a-h][1-8](?:=[NBKQR])?|[NBKQR][a-h]?[1-8]?x?[a-h][1-8]|O-O(?:-O)?)[+#]?"


def test_chess_gbnf(llm):
    grammar = LlamaGrammar.from_file(GRAMMARS / "chess.gbnf")
    for seed in SEEDS:
        text, finish = generate(llm, grammar, seed, "Play chess.", processors=push_towards(llm, b"\n", 4.0))
        lines = complete_lines(text, finish == "stop")
        assert text.startswith("1. ")
        assert all(re.fullmatch(rf"[1-9][0-9]?\. {MOVE} {MOVE}", line) for line in lines), text


def arithmetic_line(s: str) -> bool:
    """Recursive descent over arithmetic.gbnf's rules: expr "=" ws term (the newline stripped)."""
    pos = 0

    def ws():
        nonlocal pos
        while pos < len(s) and s[pos] in " \t\n":
            pos += 1

    def term() -> bool:
        nonlocal pos
        if pos < len(s) and s[pos] == "(":
            pos += 1
            ws()
            if not expr() or pos >= len(s) or s[pos] != ")":
                return False
            pos += 1
            ws()
            return True
        m = re.compile(r"[a-z][a-z0-9_]*|[0-9]+").match(s, pos)
        if not m:
            return False
        pos = m.end()
        ws()
        return True

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(s) and s[pos] in "-+*/":
            pos += 1
            if not term():
                return False
        return True

    if not expr() or pos >= len(s) or s[pos] != "=":
        return False
    pos += 1
    ws()
    return term() and pos == len(s)


def test_arithmetic_gbnf(llm):
    grammar = LlamaGrammar.from_file(GRAMMARS / "arithmetic.gbnf")
    assert arithmetic_line("(a +12)*b= 7 ") and not arithmetic_line("a + 12= 3")  # the checker itself
    checked = 0
    for seed in SEEDS:
        text, finish = generate(llm, grammar, seed, "What is 2 + 3?", processors=push_towards(llm, b"\n", 12.0))
        # ws may hold newlines, so lines end where a term is followed by "\n" and the next line starts
        lines = re.findall(r"(.*?=[ \t\n]*[^\n]*?)\n", text, re.S)
        checked += len(lines)
        assert all(arithmetic_line(line) for line in lines), text
    assert checked


def test_a_grammar_of_two_words(llm):
    grammar = LlamaGrammar.from_string('root ::= "yes" | "no"')
    seen = {generate(llm, grammar, seed, "Is the sky blue?") for seed in range(6)}
    assert {text for text, _ in seen} <= {"yes", "no"} and {finish for _, finish in seen} == {"stop"}


def test_completion_takes_a_grammar_and_json_schema(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 99}},
              "required": ["ok", "n"]}
    for seed in SEEDS:
        out = llm("Answer:", max_tokens=40, temperature=1.0, seed=seed, grammar=LlamaGrammar.from_json_schema(
            json.dumps(schema)))["choices"][0]
        assert out["finish_reason"] == "stop"
        value = json.loads(out["text"])
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99


def test_json_object_is_a_useful_object(llm):
    """json_object: one object with at least one member (an empty {} answers nothing)."""
    finished = 0
    for seed in SEEDS:
        out = llm.create_chat_completion([{"role": "user", "content": "Reply in JSON."}], max_tokens=64,
                                         temperature=1.0, seed=seed, response_format={"type": "json_object"},
                                         logits_processor=push_towards(llm, b'"}', 12.0))["choices"][0]
        if out["finish_reason"] == "stop":
            finished += 1
            value = json.loads(out["message"]["content"])
            assert isinstance(value, dict) and value
    assert finished


def test_bad_grammars_are_value_errors(llm, tmp_path):
    with pytest.raises(ValueError, match="GBNF"):
        LlamaGrammar.from_string("root ::= (")
    with pytest.raises(ValueError, match="grammar"):
        LlamaGrammar.from_string("root ::= undefined_rule")
    with pytest.raises(ValueError, match="non-empty"):
        Grammar.from_gbnf("")
    with pytest.raises(FileNotFoundError):
        LlamaGrammar.from_file(tmp_path / "missing.gbnf")
    with pytest.raises(ValueError, match="only one"):
        llm("x", grammar=LlamaGrammar.from_string('root ::= "a"'), response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="LlamaGrammar"):
        llm("x", grammar='root ::= "a"')
