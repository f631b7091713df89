"""Constrained decoding cost: llguidance's token mask per step against the decode step.

Run: python3 benchmarks/grammar_mask.py [--tokenizer path/to/phi-4/tokenizer.json] [--write]

For each vocabulary (the built-in model's 2048 tokens, and a large tokenizer.json such as Phi-4's
100k) and each grammar (a tool call's JSON schema, llama.cpp's json.gbnf, `json_object`), a matcher
walks the tokens of a valid document; each step times `Matcher.mask` (llguidance's bitmask, unpacked
and applied to a logits row, as `Llama` does before sampling), then consumes the document's next
token. The decode step of the built-in model is measured in the same run; the Phi-4 step is the
`upg bench` figure of docs/BENCHMARKS.md. --write fills the "grammar-mask" block there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from doc_block import fill
from upg_backend.grammar import Grammar, Matcher, TokenTable
from upg_backend.llama import Llama
from upg_backend.tokenizer import Tokenizer
from upg_backend.tools import ToolChoice

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit", "days"]}}}
DOC = {"city": "San Francisco, California", "unit": "celsius", "days": 7}
JSON_GBNF = Path(__file__).resolve().parents[1] / "tests" / "data" / "grammars" / "json.gbnf"


def cases() -> list[tuple[str, Grammar, str]]:
    call = json.dumps({"name": "get_weather", "arguments": DOC})
    return [("tool call (required)", ToolChoice([TOOL], "required").grammar(), f"<tool_call>\n{call}\n</tool_call>"),
            ("llama.cpp json.gbnf", Grammar.from_gbnf(JSON_GBNF.read_text()), json.dumps(DOC)),
            ("json_object", Grammar.from_response_format({"type": "json_object"}), json.dumps(DOC))]


def measure(tokenizer: Tokenizer, n_vocab: int, eos: list[int]) -> tuple[float, list[tuple[str, int, float, float]]]:
    t = time.perf_counter()
    table = TokenTable(tokenizer.to_json(), n_vocab, eos)
    build = time.perf_counter() - t
    logits = np.random.default_rng(0).standard_normal(n_vocab, dtype=np.float32)
    rows = []
    for name, grammar, doc in cases():
        times = []
        for _ in range(5):  # the document five times over, each with a fresh matcher
            m = Matcher(grammar, table)
            for token in tokenizer.encode(doc, add_bos=False):
                t = time.perf_counter()
                m.mask(logits)
                times.append(time.perf_counter() - t)
                m.consume(token)
        times.sort()
        rows.append((name, len(times) // 5, statistics.median(times) * 1e6, times[int(len(times) * 0.9)] * 1e6))
    return build, rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def decode_step_ms(llm: Llama, n: int = 200) -> float:
    llm.reset()
    llm.eval([llm.token_bos()])
    times = []
    for i in range(n):
        t = time.perf_counter()
        llm.eval([int(i % 1000) + 5])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "phi-4" / "tokenizer.json")
    ap.add_argument("--phi4-step-ms", type=float, default=179.5,
                    help="Phi-4 q4 decode step to compare with (docs/BENCHMARKS.md, upg bench: 5.57 tok/s on 2 cores)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    llm = Llama(n_ctx=1024, n_threads=2)
    step = decode_step_ms(llm)
    out = [f"Machine: {cpu_name()}, {os.cpu_count()} cores; "
           f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; `python3 benchmarks/grammar_mask.py --write`.", "",
           "| vocabulary | grammar | steps | mask median (µs) | p90 (µs) | decode step (ms) | mask / step |",
           "|---|---|---|---|---|---|---|"]
    vocabularies = [("built-in, 2048", llm.tokenizer, llm.n_vocab(), llm._eos_ids, step, "measured here")]
    if args.tokenizer.is_file():
        tok = Tokenizer(json.loads(args.tokenizer.read_text()), {})
        vocabularies.append((f"Phi-4, {tok.n_vocab}", tok, tok.n_vocab, [tok.token_id("<|im_end|>") or 0],
                             args.phi4_step_ms, "Phi-4 q4, upg bench"))
    builds = []
    for label, tok, n_vocab, eos, step_ms, source in vocabularies:
        build, rows = measure(tok, n_vocab, eos)
        builds.append(f"{label}: {build * 1e3:.0f} ms")
        for name, steps, med, p90 in rows:
            out.append(f"| {label} | {name} | {steps} | {med:.0f} | {p90:.0f} | {step_ms:.2f} ({source}) | "
                       f"{med / 1e3 / step_ms:.2%} |")
    out += ["", "Token table (built once per model, on the first constrained request): " + "; ".join(builds) + "."]
    text = "\n".join(out)
    print(text)
    if args.write:
        fill(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "grammar-mask", text)


if __name__ == "__main__":
    main()
