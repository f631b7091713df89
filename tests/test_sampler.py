"""The C++ sampler against a numpy statement of each step, and one model serving several sessions."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import make_hf_checkpoint
from upg_backend import _core
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile

V = 64
RNG = np.random.default_rng(0)


def params(**kw) -> _core.SamplingParams:
    """Everything off (greedy) except what kw turns on."""
    p = _core.SamplingParams()
    off = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
               presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64)
    for k, v in {**off, **kw}.items():
        setattr(p, k, v)
    return p


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    make_hf_checkpoint(d / "hf", "Phi3ForCausalLM", vocab_size=V)
    convert_hf(d / "hf", d / "m.upg", type="f32", progress=False)
    model = _core.Model(str(d / "m.upg"), UPGFile(d / "m.upg").config.engine_config())
    return _core.Session(model, 64, "f32", 1)


def draws(session, logits, p, n=400, history=()):
    session.set_seed(123)
    h = np.array(history, np.int32)
    return [session.sample(logits, p, h) for _ in range(n)]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax_and_bias_moves_it(session):
    logits = RNG.standard_normal(V).astype(np.float32)
    assert session.sample(logits, params(), np.array([], np.int32)) == int(np.argmax(logits))
    target = int(np.argmin(logits))
    p = params()
    p.logit_bias = {target: 100.0}
    assert session.sample(logits, p, np.array([], np.int32)) == target
    p.logit_bias = {int(np.argmax(logits)): -np.inf}
    assert session.sample(logits, p, np.array([], np.int32)) == int(np.argsort(logits)[-2])


def test_penalties_match_their_formula(session):
    history = [3, 3, 3, 7, 11, 11]
    p = params(repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25)
    for _ in range(50):
        logits = RNG.standard_normal(V).astype(np.float32)
        logits[RNG.choice([3, 7, 11])] += 2.0  # a penalized token usually leads before the penalties
        expected = logits.astype(np.float64)
        for tok in set(history):
            x = expected[tok]
            expected[tok] = (x / 1.3 if x > 0 else x * 1.3) - 0.4 * history.count(tok) - 0.25
        assert session.sample(logits, p, np.array(history, np.int32)) == int(np.argmax(expected))


def test_penalty_window(session):
    logits = np.zeros(V, np.float32)
    logits[5] = 1.0
    logits[6] = 0.9
    # token 5 is outside a window of 2 and keeps its lead; inside a window of 3 it is penalized
    assert session.sample(logits, params(presence_penalty=0.5, penalty_last_n=2), np.array([5, 1, 2], np.int32)) == 5
    assert session.sample(logits, params(presence_penalty=0.5, penalty_last_n=3), np.array([5, 1, 2], np.int32)) == 6


@pytest.mark.parametrize("kind", ["top_k", "top_p", "min_p", "typical_p"])
def test_truncation_keeps_exactly_the_allowed_set(session, kind):
    logits = (RNG.standard_normal(V) * 2).astype(np.float32)
    order = np.argsort(-logits, kind="stable")
    prob = softmax(logits.astype(np.float64))
    if kind == "top_k":
        allowed, p = set(order[:5]), params(temperature=1.0, top_k=5)
    elif kind == "top_p":
        cum = np.cumsum(prob[order])
        allowed, p = set(order[: int(np.searchsorted(cum, 0.7)) + 1]), params(temperature=1.0, top_p=0.7)
    elif kind == "min_p":
        allowed, p = set(np.flatnonzero(prob >= 0.2 * prob.max())), params(temperature=1.0, min_p=0.2)
    else:
        surprise = np.abs(-np.log(prob) - (-(prob * np.log(prob)).sum()))
        by_typicality = np.argsort(surprise, kind="stable")
        cum = np.cumsum(prob[by_typicality])
        allowed, p = set(by_typicality[: int(np.searchsorted(cum, 0.5)) + 1]), params(temperature=1.0, typical_p=0.5)
    got = draws(session, logits, p)
    assert set(got) <= allowed
    assert len(set(got)) > 1 or len(allowed) == 1  # it samples, not only the top token


def test_temperature_matches_the_softmax(session):
    logits = np.array([2.0, 1.0, 0.0] + [-1e9] * (V - 3), np.float32)
    for t in (0.5, 1.0, 2.0):
        got = np.bincount(draws(session, logits, params(temperature=t), n=4000), minlength=3)[:3] / 4000
        assert np.abs(got - softmax(np.array([2.0, 1.0, 0.0]) / t)).max() < 0.03


def test_same_seed_same_draws(session):
    logits = RNG.standard_normal(V).astype(np.float32)
    p = params(temperature=1.0)
    assert draws(session, logits, p, n=50) == draws(session, logits, p, n=50)
    session.set_seed(7)
    other = [session.sample(logits, p, np.array([], np.int32)) for _ in range(50)]
    assert other != draws(session, logits, p, n=50)


def test_bad_sampler_input(session):
    with pytest.raises(ValueError, match="n_vocab"):
        session.sample(np.zeros(V + 1, np.float32), params(), np.array([], np.int32))
    p = params()
    p.logit_bias = {V: 1.0}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        session.sample(np.zeros(V, np.float32), p, np.array([], np.int32))
    p.logit_bias = {i: -np.inf for i in range(V)}
    with pytest.raises(ValueError, match="banned"):
        session.sample(np.zeros(V, np.float32), p, np.array([], np.int32))


def test_one_model_serves_sessions_in_parallel(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", "Phi3ForCausalLM", vocab_size=V)
    convert_hf(tmp_path / "hf", tmp_path / "m.upg", type="q8_0", progress=False)
    model = _core.Model(str(tmp_path / "m.upg"), UPGFile(tmp_path / "m.upg").config.engine_config())
    prompts = [RNG.integers(0, V, 40, dtype=np.int32) for _ in range(4)]

    def evals(p):  # two passes (prefill, then a short pass that takes the per-token attention path)
        s = _core.Session(model, 64, "f16", 1)
        return np.concatenate([s.eval(p[:25], True), s.eval(p[25:], True)])

    # The same passes alone and in parallel: with no shared mutable state the bits are the same
    # (one 40-token pass against 25 + 15 would differ by summation order, which 8-bit activations
    # can amplify past any tolerance).
    alone = [evals(p) for p in prompts]
    results = [None] * 4

    def run(i):
        results[i] = evals(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(results, alone):
        np.testing.assert_array_equal(got, ref)
