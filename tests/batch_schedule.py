"""What the batch tests share (tests/test_batch.py, tests/gpu/test_cuda_batch.py): random prompts,
a sequence run alone on a Session, and the schedule: sequences join a BatchSession at random steps,
their prompts cut into chunks of 1 to 13 tokens beside the others' generated tokens, then greedy
tokens (or `forced` ones, so that two backends run the same tokens), each leaving after its n_gen;
every step's entries shuffled."""
from __future__ import annotations

import numpy as np

from upg_backend import _core


def prompts(n, seed=0, vocab=320):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(1, 40))).tolist() for _ in range(n)]


def alone(model, prompt, n_gen, n_ctx=96, backend=None):
    """Greedy run of one sequence on a Session: (logits of the last prompt token and of every
    generated token, the generated tokens)."""
    s = _core.Session(model, n_ctx, "f16", 2, 512, backend)
    rows = [s.eval(np.array(prompt, np.int32), False, False)[0]]
    out = []
    for _ in range(n_gen):
        out.append(int(np.argmax(rows[-1])))
        rows.append(s.eval(np.array(out[-1:], np.int32), False, True)[0])
    return np.array(rows), out


def run_schedule(b, ps, n_gen, forced=None):
    """Runs prompts ps on BatchSession b (one slot each). Returns each sequence's logits rows (its
    prompt's last, then one per generated token) and its generated tokens."""
    rng = np.random.default_rng(2)
    start = [int(rng.integers(0, 12)) for _ in ps]  # the step each sequence joins at
    state = [dict(off=0, rows=[], gen=[]) for _ in ps]
    step = 0
    while any(len(s["gen"]) < g or s["off"] < len(p) or len(s["rows"]) <= g
              for s, p, g in zip(state, ps, n_gen)):
        entries, who = [], []
        for i, (s, p, g) in enumerate(zip(state, ps, n_gen)):
            if step < start[i] or len(s["rows"]) > g:
                continue
            if s["off"] < len(p):  # prompt chunk
                k = int(rng.integers(1, 14))
                chunk = p[s["off"]:s["off"] + k]
                last = s["off"] + len(chunk) == len(p)
                entries.append((i, np.array(chunk, np.int32), False, int(last)))
                who.append((i, len(chunk), last))
            else:
                tok = forced[i][len(s["gen"])] if forced else int(np.argmax(s["rows"][-1]))
                s["gen"].append(tok)
                entries.append((i, np.array([tok], np.int32), True, 1))
                who.append((i, 1, True))
        step += 1
        if not entries:
            continue
        rng.shuffle(order := list(range(len(entries))))
        entries = [entries[j] for j in order]
        who = [who[j] for j in order]
        logits = b.step(entries)
        row = 0
        for i, k, has_row in who:
            s = state[i]
            if s["off"] < len(ps[i]):
                s["off"] += k
            if has_row:
                s["rows"].append(logits[row])
                row += 1
    return [np.array(s["rows"]) for s in state], [s["gen"] for s in state]
