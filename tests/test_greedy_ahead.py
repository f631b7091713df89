"""Greedy decoding on the backend (Session.decode_greedy, and Llama's greedy completions through
it, llama._GreedyAhead) against the host loop of eval + argmax, on the CPU backend: the same
tokens, the same KV cache, the same context and logits after every way a completion can end."""
from __future__ import annotations

import numpy as np
import pytest

from upg_backend import _core
from upg_backend.builtin import builtin_model_path
from upg_backend.format import UPGFile
from upg_backend.llama import GREEDY_CHUNK, Llama
from upg_backend.sampling import SamplingParams

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def session(n_ctx=96):
    path = builtin_model_path()
    return _core.Session(_core.Model(str(path), UPGFile(path).config.engine_config()), n_ctx, "f16", 2)


def test_decode_greedy_matches_eval_and_argmax():
    host, dev = session(), session()
    prompt = np.arange(5, 25, dtype=np.int32)
    first = int(np.argmax(host.eval(prompt)[-1]))
    dev.eval(prompt)
    want, tok = [], first
    for _ in range(21):
        tok = int(np.argmax(host.eval(np.array([tok], np.int32))[-1]))
        want.append(tok)
    got = dev.decode_greedy(first, 13).tolist()
    got += dev.decode_greedy(got[-1], 8).tolist()  # a second call continues from the device's state
    assert got == want
    assert dev.n_past == host.n_past == len(prompt) + 21
    np.testing.assert_array_equal(dev.save_kv(), host.save_kv())


def test_decode_greedy_rejects_what_eval_rejects():
    s = session(n_ctx=8)
    s.eval(np.arange(1, 5, dtype=np.int32))
    with pytest.raises(ValueError, match="context full"):
        s.decode_greedy(1, 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.decode_greedy(10 ** 6, 1)
    with pytest.raises(ValueError):
        s.decode_greedy(1, 0)
    assert s.n_past == 4
    assert len(s.decode_greedy(1, 4)) == 4 and s.n_past == 8


@pytest.fixture(scope="module")
def pair():
    """The built-in model twice: greedy completions on the host loop, and through decode_greedy."""
    with Llama(n_ctx=512, n_threads=1, verbose=False) as host, Llama(n_ctx=512, n_threads=1, verbose=False) as dev:
        host.greedy_ahead, dev.greedy_ahead = False, True
        yield host, dev


def same_state(host, dev):
    assert dev.input_ids.tolist() == host.input_ids.tolist()
    np.testing.assert_array_equal(dev.scores[-1], host.scores[-1])


# max_tokens around the chunk's edges, a stop string, and the model's own end of turn.
CASES = [dict(max_tokens=1), dict(max_tokens=GREEDY_CHUNK), dict(max_tokens=GREEDY_CHUNK + 1),
         dict(max_tokens=30, stop=["Paris"]), dict(max_tokens=200)]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_greedy_completion_is_the_host_loops(pair, kwargs):
    host, dev = pair
    want = host.create_chat_completion(MESSAGES, temperature=0, **kwargs)
    got = dev.create_chat_completion(MESSAGES, temperature=0, **kwargs)
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    assert got["usage"] == want["usage"]
    same_state(host, dev)


def test_the_model_ends_its_turn_inside_a_chunk(pair):
    """The last case above ends on the end-of-turn token, not the length limit."""
    host, _ = pair
    out = host.create_chat_completion(MESSAGES, temperature=0, max_tokens=200)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] % GREEDY_CHUNK != 0


def test_a_stream_closed_early_leaves_the_same_context(pair):
    host, dev = pair
    for llm in pair:
        stream = llm.create_completion("The river", temperature=0, max_tokens=40, stream=True)
        for _ in range(3):
            next(stream)
        stream.close()
    same_state(host, dev)
    greedy = SamplingParams(temperature=0)
    assert dev.sample(greedy) == host.sample(greedy)


def test_sampling_that_needs_the_logits_stays_on_the_host(pair):
    _, dev = pair
    assert dev._greedy_ahead(dev._params(None, None, 0, temperature=0), None, None, None, None) is not None
    for params, logprobs in [(dict(temperature=0.7), None), (dict(temperature=0, repeat_penalty=1.3), None),
                             (dict(temperature=0, logit_bias={3: 1.0}), None), (dict(temperature=0), 2)]:
        assert dev._greedy_ahead(dev._params(None, None, 0, **params), None, logprobs, None, None) is None
