"""How far apart 8-bit-activation engines land on one model: ours, llama.cpp and a float64 numpy
statement of our arithmetic, on the same q8_0 weights.

Run: python3 benchmarks/activation_rounding.py OURS.upg PEER.gguf --peer-python $PEER_VENV/bin/python

Prints, for the logits of every position of a fixed text, the median of max|a - b| / max|b| and the
top-1 agreement between: our engine, llama.cpp, the numpy forward pass with 8-bit activations
(tests/reference/forward.py, our arithmetic in float64), the same pass with every activation
perturbed by 6e-8 relative (float32 rounding) before it is quantized, and the pass with f32
activations. How far the perturbed pass lands from the unperturbed one is how far any two
implementations that round differently in float32 must be expected to land apart.
The q8_0 file should be converted from the GGUF so that both engines hold the same weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
        "changed physics: on the photoelectric effect, Brownian motion, special relativity and mass-energy "
        "equivalence.")

PEER = """
import json, sys
import numpy as np
from llama_cpp import Llama
toks = json.load(open(sys.argv[2]))
llm = Llama(sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, verbose=False, n_batch=512)
llm.eval(toks)
np.save(sys.argv[3], np.array(llm.scores[:len(toks)], np.float32))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("peer", type=Path)
    ap.add_argument("--peer-python", required=True)
    args = ap.parse_args()

    import reference.forward as forward
    from upg_backend.format import UPGFile
    from upg_backend.llama import Llama

    llm = Llama(str(args.ours), n_ctx=512, logits_all=True, kv_type="f32", n_threads=2)
    toks = llm.tokenize(TEXT.encode(), add_bos=False)
    llm.eval(toks)
    logits = {"ours": np.array(llm.scores[:len(toks)], np.float64)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "toks.json").write_text(json.dumps(toks))
        subprocess.run([args.peer_python, "-c", PEER, str(args.peer), f"{tmp}/toks.json", f"{tmp}/peer.npy"],
                       check=True)
        logits["llama.cpp"] = np.load(f"{tmp}/peer.npy").astype(np.float64)
    upg = UPGFile(args.ours)
    weights = forward.load_weights(upg)
    logits["numpy, 8-bit activations"] = forward.forward(weights, upg.config, toks)
    exact, rng = forward.activations_as_used, np.random.default_rng(0)
    forward.activations_as_used = lambda t, b, x: exact(t, b, x * (1 + 6e-8 * rng.standard_normal(np.shape(x))))
    logits["numpy, 8-bit, perturbed"] = forward.forward(weights, upg.config, toks)
    forward.activations_as_used = exact
    forward.ACT_Q8_TYPES = ()  # the same pass, activations left in float
    logits["numpy, f32 activations"] = forward.forward(weights, upg.config, toks)

    names = list(logits)
    print(f"{len(toks)} positions; median relative logit difference / top-1 agreement\n")
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for a in names:
        cells = []
        for b in names:
            x, y = logits[a], logits[b]
            rel = np.median(np.abs(x - y).max(axis=1) / np.abs(y).max(axis=1))
            cells.append(f"{rel:.4f} / {100 * np.mean(x.argmax(1) == y.argmax(1)):.0f}%")
        print(f"| {a} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
