"""Many sequences in one pass (cpp/upg/batch.h, upg_backend/batch.py): each sequence's logits have
the bits of the same sequence run alone, whatever else a step holds, however its prompt was cut
into passes, and whether its prefix came from another slot's cache.

The reference is the single-sequence `_core.Session` (itself held to transformers and the numpy
reference in test_parity.py): prompt tokens evaluated as prompt tokens, then one generated token
per eval.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from batch_schedule import alone, prompts, run_schedule
from conftest import make_hf_checkpoint
from upg_backend import _core
from upg_backend.batch import Batch
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile
from upg_backend.llama import Llama

TYPES = ["q4", "q8_0", "f16"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    src = make_hf_checkpoint(root / "hf", "Phi3ForCausalLM", seed=5, hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    out = {}
    for t in TYPES:
        out[t] = root / f"{t}.upg"
        convert_hf(src, out[t], type=t, block=32, progress=False)
    return out


def core_model(path):
    return _core.Model(str(path), UPGFile(path).config.engine_config())


@pytest.mark.parametrize("type_, backend, n_seq", [(t, "cpu", 16) for t in TYPES] +
                         [("q4", "metal-harness", 4), ("f16", "metal-harness", 4)])
def test_batch_equals_each_sequence_alone(models, type_, backend, n_seq, request):
    """16 sequences through 16 slots (4 on the Metal backend's launches on the CPU harness): they
    join at different steps (their prompts cut into chunks of 1 to 13 tokens, mixed with the others'
    generated tokens) and leave after different lengths; every logits row has the bits of the
    sequence alone on a Session of the same backend."""
    model = core_model(models[type_])
    gpu = None
    if backend == "metal-harness":
        from metal_harness.gpu import HarnessGpu

        gpu = HarnessGpu(request.getfixturevalue("lib"))
    ps = prompts(n_seq, seed=1)
    n_gen = [3 + (i * 7) % 11 for i in range(n_seq)]
    want = [alone(model, p, g, backend=gpu) for p, g in zip(ps, n_gen)]
    got_rows, got_gen = run_schedule(_core.BatchSession(model, n_seq, 96, "f16", 2, 64, gpu), ps, n_gen)
    for i, (rows, gen) in enumerate(want):
        assert got_gen[i] == gen, f"sequence {i}"
        np.testing.assert_array_equal(got_rows[i], rows, err_msg=f"sequence {i}")


@pytest.mark.parametrize("type_", ["q4", "q8_0"])
def test_prompt_in_one_pass_or_chunks_or_from_another_slot(models, type_):
    """A prompt's logits and what follows have the same bits whether it was evaluated in one pass,
    in chunks of any size (alone or beside others' generated tokens), or started from a prefix
    another slot computed (copy_prefix)."""
    model = core_model(models[type_])
    prompt = prompts(1, seed=3)[0] + prompts(1, seed=4)[0] + [7, 8, 9]
    want, gen = alone(model, prompt, 6)
    b = _core.BatchSession(model, 3, 96, "f16", 2, 96)
    for chunk in (1, 3, 7, len(prompt)):
        b.truncate(0, 0)
        b.truncate(1, 0)
        b.step([(1, np.array(prompt[:5], np.int32), False, 0)])
        rows = []
        for off in range(0, len(prompt), chunk):
            piece = prompt[off:off + chunk]
            entries = [(0, np.array(piece, np.int32), False, int(off + chunk >= len(prompt)))]
            if b.n_past(1) < 40:  # another sequence decoding beside it
                entries.append((1, np.array([5], np.int32), True, 1))
            out = b.step(entries)
            if entries[0][3]:
                rows.append(out[0])
        for t in gen:
            rows.append(b.step([(0, np.array([t], np.int32), True, 1)])[0])
        np.testing.assert_array_equal(np.array(rows), want, err_msg=f"chunks of {chunk}")
    # prefix hit: slot 2 starts from slot 0's first 20 positions
    b.copy_prefix(0, 2, 20)
    assert b.n_past(2) == 20
    rows = [b.step([(2, np.array(prompt[20:], np.int32), False, 1)])[0]]
    for t in gen:
        rows.append(b.step([(2, np.array([t], np.int32), True, 1)])[0])
    np.testing.assert_array_equal(np.array(rows), want)


def test_step_refuses_bad_entries(models):
    """A bad entry is refused with ValueError and nothing of the step is evaluated."""
    model = core_model(models["q4"])
    b = _core.BatchSession(model, 2, 8, "f16", 1, 8)
    tok = np.array([3], np.int32)
    with pytest.raises(ValueError, match="named twice"):
        b.step([(0, tok, False, 1), (0, tok, False, 1)])
    with pytest.raises(ValueError, match="slot 5"):
        b.step([(5, tok, False, 1)])
    with pytest.raises(ValueError, match="vocabulary"):
        b.step([(0, tok, False, 1), (1, np.array([320], np.int32), False, 1)])
    with pytest.raises(ValueError, match="context full"):
        b.step([(0, np.arange(9, dtype=np.int32), False, 1)])
    with pytest.raises(ValueError, match="n_batch"):
        b.step([(0, np.arange(6, dtype=np.int32), False, 1), (1, np.arange(6, dtype=np.int32), False, 1)])
    with pytest.raises(ValueError, match="logits"):
        b.step([(0, tok, False, 4)])
    with pytest.raises(ValueError, match="need ids"):
        b.step([(0, tok, False, 3)])
    with pytest.raises(ValueError, match="2 elements"):
        b.step([(0, tok, False, 3), (1, tok, False, 3)], np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="need ids"):
        b.step([(0, tok, False, 3)], np.zeros(1, np.int64))
    assert b.n_past(0) == b.n_past(1) == 0
    with pytest.raises(ValueError):
        b.copy_prefix(0, 1, 1)  # slot 0 holds nothing yet


def test_all_logits_rows(models):
    """logits 2: every token's row, as the Session's logits_all gives them."""
    model = core_model(models["q8_0"])
    prompt = prompts(1, seed=6)[0] + [4, 5]
    s = _core.Session(model, 64, "f16", 2)
    want = s.eval(np.array(prompt, np.int32), True, False)
    b = _core.BatchSession(model, 2, 64, "f16", 2, 64)
    b.step([(1, np.array([9, 9], np.int32), False, 0)])
    got = b.step([(1, np.array([3], np.int32), True, 1), (0, np.array(prompt, np.int32), False, 2)])
    assert got.shape == (1 + len(prompt), 320)
    np.testing.assert_array_equal(got[1:], want)


@pytest.mark.parametrize("type_", ["q4", "f16"])
def test_argmax_entries_give_the_first_maximum_of_their_logits(models, type_):
    """logits 3: the last token's argmax chosen on the backend, the id numpy's argmax (the first
    maximum) gives of the row logits 1 returns for the same step; the other entries' rows come
    back as before, in order, and only theirs."""
    model = core_model(models[type_])
    ps = prompts(5, seed=9)
    b = _core.BatchSession(model, 5, 96, "f16", 2, 256)
    b.step([(s, np.array(p, np.int32), False, 0) for s, p in enumerate(ps)])
    step = [(s, np.array([3 + s], np.int32), True) for s in range(4)] + [(4, np.array([7, 8], np.int32), False)]
    modes = [3, 1, 3, 0, 2]
    want = b.step([(*e, 1 if m == 3 else m) for e, m in zip(step, modes)])
    for s in range(5):
        b.truncate(s, len(ps[s]))
    ids = np.full(2, -1, np.int32)
    got = b.step([(*e, m) for e, m in zip(step, modes)], ids)
    assert list(ids) == [int(want[0].argmax()), int(want[2].argmax())]
    np.testing.assert_array_equal(got, want[[1, 3, 4]])  # slot 1's row, then slot 4's two
    assert [b.n_past(s) for s in range(5)] == [len(p) + (2 if s == 4 else 1) for s, p in enumerate(ps)]


# ---- the Python Batch: Llama views over the slots ----


def test_offline_batch_equals_llama_alone(models):
    """Batch.create_completions gives each prompt the completion Llama gives it alone, token for
    token, with stop strings, per-request sampling settings and logprobs."""
    path = str(models["q4"])
    llm = Llama(path, n_ctx=128, n_threads=2)
    ps = prompts(12, seed=7)
    kw = [dict(max_tokens=4 + i % 9, temperature=0 if i % 3 else 0.8, seed=i, logprobs=2 if i % 4 == 0 else None)
          for i in range(len(ps))]
    want = [llm.create_completion(p, **k)["choices"][0] for p, k in zip(ps, kw)]
    with Batch(llm, 5) as batch:
        got = batch._map(lambda view, i: view.create_completion(ps[i], **kw[i]), range(len(ps)))
        assert batch.steps < sum(k["max_tokens"] + 1 for k in kw)  # sequences shared steps
        same = batch.create_completions(ps, max_tokens=5, temperature=0)
    for g, w in zip(got, want):
        assert g["choices"][0]["text"] == w["text"]
        assert g["choices"][0]["logprobs"] == w["logprobs"]
        assert g["choices"][0]["finish_reason"] == w["finish_reason"]
    assert [r["choices"][0]["text"] for r in same] == \
        [llm.create_completion(p, max_tokens=5, temperature=0)["choices"][0]["text"] for p in ps]


def test_views_share_a_prompt_prefix(models):
    """A view whose prompt starts with what another slot computed copies that prefix instead of
    evaluating it, and answers as Llama does alone."""
    path = str(models["q8_0"])
    llm = Llama(path, n_ctx=128, n_threads=2)
    system = prompts(1, seed=8)[0] + prompts(1, seed=9)[0]
    a, b = system + [10, 11, 12], system + [20, 21]
    want = [llm.create_completion(p, max_tokens=6, temperature=0)["choices"][0]["text"] for p in (a, b)]
    with Batch(llm, 2) as batch:
        v0, v1 = batch.views
        for v, p, w in ((v0, a, want[0]), (v1, b, want[1])):
            batch.acquire(v)
            try:
                assert v.create_completion(p, max_tokens=6, temperature=0)["choices"][0]["text"] == w
            finally:
                batch.release(v)
        assert batch.prefix_copies == 1
        assert batch._core.n_past(1) >= len(system)


def test_the_same_prompt_again_evaluates_nothing(models, monkeypatch):
    """A prompt that is the one the context's prompt run ended with keeps its last token's logits:
    asked again (alone or on a batch's view) it evaluates no token and answers the same; a prompt
    one token shorter evaluates that last token again."""
    llm = Llama(str(models["q8_0"]), n_ctx=128, n_threads=2)
    p = prompts(1, seed=11)[0] + [3, 4, 5]
    first = llm.create_completion(p, max_tokens=5, temperature=0)["choices"][0]["text"]
    evals = []
    real, real_sample = Llama._eval, Llama._eval_sample
    monkeypatch.setattr(Llama, "_eval", lambda self, t, g: (evals.append((len(t), g)), real(self, t, g)))
    # a generated token evaluated with the next one's sampling (Session.eval_sample) counts the same
    monkeypatch.setattr(Llama, "_eval_sample", lambda self, *a: (evals.append((1, True)), real_sample(self, *a))[1])
    assert llm.create_completion(p, max_tokens=5, temperature=0)["choices"][0]["text"] == first
    assert evals == [(1, True)] * 4  # the generated tokens only
    evals.clear()
    llm.create_completion(p[:-1], max_tokens=1, temperature=0)
    assert evals[0] == (1, False)
    with Batch(llm, 2) as batch:
        v = batch.views[0]
        batch.acquire(v)
        try:
            assert v.create_completion(p, max_tokens=5, temperature=0)["choices"][0]["text"] == first
            evals.clear()
            assert v.create_completion(p, max_tokens=5, temperature=0)["choices"][0]["text"] == first
            assert evals == [(1, True)] * 4
        finally:
            batch.release(v)


def test_batch_refuses_an_unknown_kernel(models):
    llm = Llama(str(models["q4"]), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="generated must be 'matvec' or 'matmul'"):
        Batch(llm, 2, generated="mat-vec")


def test_closed_batch_fails_waiting_evals(models):
    llm = Llama(str(models["q4"]), n_ctx=64, n_threads=1)
    batch = Batch(llm, 2)
    batch.close()
    with pytest.raises(ValueError, match="closed"):
        batch.views[0].create_completion([5, 6], max_tokens=2)
    assert not any(t.name == "upg-batch" and t.is_alive() for t in threading.enumerate() if t is batch._thread)


# ---- the case: a real model whose logits 8-bit activations make order-sensitive ----


@pytest.fixture(scope="module")
def smollm2_q8(tmp_path_factory):
    from conftest import smollm2_gguf_path
    from upg_backend.gguf_source import convert_gguf

    path = tmp_path_factory.mktemp("smollm2") / "q8_0.upg"
    convert_gguf(smollm2_gguf_path(), path, type="q8_0", progress=False)
    return str(path)


def test_smollm2_answers_the_same_on_a_cache_hit_and_in_a_batch(smollm2_q8):
    """SmolLM2 q8_0, greedy: a question asked again (its prompt now cached, all but the last token),
    asked after another question (a shared system prompt cached), or asked among 7 others in a
    batch gets the answer it got first, token for token."""
    system = {"role": "system", "content": "You are a helpful assistant who tells short stories."}
    questions = ["Write the first sentence of a story about a storm.", "Name three colors of the sunset.",
                 "What is the capital of France?", "Describe a cat in one sentence.",
                 "Tell me a fact about the Moon.", "Write a haiku about rain.", "What do bees make?",
                 "Give me a name for a boat."]
    convs = [[system, {"role": "user", "content": q}] for q in questions]
    llm = Llama(smollm2_q8, n_ctx=512, n_threads=2)

    def ask(model, conv):
        return model.create_chat_completion(conv, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    first = [ask(llm, c) for c in convs]  # each after the previous: the system prompt is a cache hit
    with Llama(smollm2_q8, n_ctx=512, n_threads=2) as fresh:
        assert ask(fresh, convs[0]) == first[0]  # a miss
        assert ask(fresh, convs[0]) == first[0]  # the whole prompt but its last token cached
        assert ask(fresh, convs[3]) == first[3]
    with Batch(llm, 8) as batch:
        got = [r["choices"][0]["message"]["content"]
               for r in batch.create_chat_completions(convs, max_tokens=24, temperature=0)]
    assert got == first
    assert len(set(first)) == len(first)


def test_a_slot_samples_and_truncates_while_another_step_runs(smollm2_q8):
    """While a long step runs (a 500-token prompt of SmolLM2 on one thread: 0.3 s here), another
    slot samples and truncates at once (its generator's lock and its own length, not the batch's
    lock), and truncating a slot of the running step, which waits for the step, lets the other
    Python threads run meanwhile (it releases the GIL)."""
    model = core_model(smollm2_q8)
    b = _core.BatchSession(model, 2, 512, "f16", 1, 512)
    vocab = UPGFile(smollm2_q8).config.vocab_size
    greedy = _core.SamplingParams()
    greedy.temperature = 0.0
    logits = np.zeros(vocab, np.float32)
    logits[7] = 1.0
    b.step([(1, np.arange(10, 20, dtype=np.int32), False, 0)])
    started, done = threading.Event(), threading.Event()

    def long_step():
        started.set()
        b.step([(0, np.arange(10, 510, dtype=np.int32), False, 1)])
        done.set()
    stepper = threading.Thread(target=long_step)
    stepper.start()
    started.wait()
    time.sleep(0.05)  # the step holds the batch's lock now
    assert b.sample(1, logits, greedy, np.zeros(0, np.int32)) == 7
    b.truncate(1, 4)
    assert not done.is_set(), "slot 1's sample or truncate waited for slot 0's step"
    assert b.n_past(1) == 4
    ticks = []

    def tick():
        while not done.is_set():
            ticks.append(1)
            time.sleep(0.001)
    ticker = threading.Thread(target=tick)
    ticker.start()
    before = len(ticks)
    b.truncate(0, 100)  # slot 0 is the step's: this waits for it (before it, slot 0 held 0 positions)
    stepper.join()
    ticker.join()
    assert b.n_past(0) == 100
    assert len(ticks) - before > 10, "truncate held the GIL while it waited"


def test_views_of_a_gpu_llama_decode_through_the_batch(models):
    """A Llama on a GPU backend chooses greedy tokens by decode_greedy (greedy_ahead); its views
    have no session of their own, so theirs go through the batch's steps."""
    llm = Llama(str(models["q8_0"]), n_ctx=128, n_threads=2)
    llm.greedy_ahead = True  # as on a GPU backend
    p = prompts(1, seed=12)[0]
    want = llm.create_completion(p, max_tokens=6, temperature=0)["choices"][0]["text"]
    with Batch(llm, 2) as batch:
        assert batch.create_completions([p], max_tokens=6, temperature=0)[0]["choices"][0]["text"] == want


def test_greedy_views_take_the_argmax_from_the_backend(models, monkeypatch):
    """Views of a batch on a GPU choose greedy tokens by argmax steps (their greedy_ahead, as
    there): the completions, their finish reasons and the scores left behind are a lone Llama's;
    sampled and logprob requests beside them still get logits rows."""
    path = str(models["q4"])
    llm = Llama(path, n_ctx=128, n_threads=2)
    ps = prompts(6, seed=13)
    kw = [dict(max_tokens=3 + i, temperature=0 if i % 3 else 0.7, seed=i, logprobs=1 if i == 4 else None)
          for i in range(len(ps))]
    want = []
    for p, k in zip(ps, kw):
        want.append((llm.create_completion(p, **k)["choices"][0], llm.scores[-1].copy(), llm.n_tokens))
    steps = []
    with Batch(llm, 3) as batch:
        for view in batch.views:
            view.greedy_ahead = True  # as the batch sets it on a GPU backend
        real = batch._core

        class Spy:  # counts the argmax entries of each step
            def __getattr__(self, name):
                return getattr(real, name)

            def step(self, entries, ids=None):
                steps.append(sum(e[3] == 3 for e in entries))
                return real.step(entries, ids)
        monkeypatch.setattr(batch, "_core", Spy())
        got = batch._map(lambda view, i: (view.create_completion(ps[i], **kw[i])["choices"][0],
                                          view.scores[-1].copy(), view.n_tokens), range(len(ps)))
    # every greedy request without logprobs that ran to its length: one argmax step a token after the first
    assert sum(steps) >= sum(k["max_tokens"] - 1 for k, (w, _, _) in zip(kw, want)
                             if k["temperature"] == 0 and k["logprobs"] is None and w["finish_reason"] == "length") > 0
    for (g, scores, n_tokens), (w, w_scores, w_tokens) in zip(got, want):
        assert (g["text"], g["finish_reason"], g["logprobs"]) == (w["text"], w["finish_reason"], w["logprobs"])
        assert n_tokens == w_tokens
        np.testing.assert_array_equal(scores, w_scores)
