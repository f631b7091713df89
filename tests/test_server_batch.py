"""The server on a Batch (`--parallel N`): requests admitted into the running batch and retired
from it, the queue's limits, clients that vanish, and answers that are the same alone or among
many. Every test drives the server over loopback with the official `openai` client or plain HTTP.
"""
from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time
import urllib.error
import urllib.request

import httpx
import openai
import pytest

from chat_model import SERVER_N_CTX as N_CTX, join_and_leave, messages, model_path, reference  # noqa: F401 (fixtures)
from conftest import serve_app
from upg_backend.batch import Batch
from upg_backend.llama import Llama
from upg_backend.server import batch_n_ctx, create_app



def start(model_path, parallel, **kwargs):
    llama = Llama(model_path, n_ctx=N_CTX, n_threads=2)
    batch = Batch(llama, parallel)
    srv, thread, url = serve_app(create_app(llama, model_name="tiny", batch=batch, **kwargs))

    def stop():
        srv.should_exit = True
        thread.join(10)
        batch.close()
    return llama, batch, url, stop


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def no_eos(llama) -> dict[str, float]:
    return {str(t): -100 for t in llama._eos_ids}


def wait_until(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_join_and_leave_a_running_batch(model_path, reference):
    """Requests that arrive while others generate are admitted between steps and share them;
    each answer is the one Llama gives alone, bit for bit (greedy and seeded sampling)."""
    llama, batch, url, stop = start(model_path, 4)
    try:
        join_and_leave(url, batch, reference)
    finally:
        stop()


def slow_generation(monkeypatch):
    """Each generated token takes 20 ms more, so that long requests are still running when the
    test needs them to be."""
    real_eval = Llama._eval

    def slow_eval(self, tokens, generated):
        if generated:
            time.sleep(0.02)
        real_eval(self, tokens, generated)
    monkeypatch.setattr(Llama, "_eval", slow_eval)


def test_a_vanished_client_frees_its_slot_at_once(model_path, monkeypatch):
    """A client that goes away mid-stream leaves the batch at the next step: its slot takes the
    next request while the other slot's long generation goes on."""
    slow_generation(monkeypatch)
    llama, batch, url, stop = start(model_path, 2)
    try:
        c = client(url)
        long_done = threading.Event()

        def long_request():
            c.completions.create(model="tiny", prompt="Once", max_tokens=150, temperature=0, logit_bias=no_eos(llama))
            long_done.set()
        t = threading.Thread(target=long_request)
        t.start()
        stream = c.completions.create(model="tiny", prompt="Tell", max_tokens=150, temperature=0, stream=True,
                                      logit_bias=no_eos(llama))
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.close()
        wait_until(lambda: len(batch._active) == 1)  # only the long request holds a slot now
        got = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert got.choices[0].finish_reason in ("stop", "length")
        assert not long_done.is_set()  # served while the long request was still generating
        t.join(60)
        wait_until(lambda: not batch._active)
    finally:
        stop()


def test_queue_limit_answers_429_and_timeout_503(model_path, monkeypatch):
    """With both slots busy and the one place in the queue taken, a request is answered 429 at once;
    the one waiting in the queue past queue_timeout is answered 503. Both say when to retry."""
    slow_generation(monkeypatch)
    llama, batch, url, stop = start(model_path, 2, queue_size=1, queue_timeout=1.0)
    try:
        c = client(url)
        hold = threading.Event()
        streams = []
        for i in range(2):  # two streams hold the two slots as long as they are not read
            s = c.completions.create(model="tiny", prompt=f"Hold {i}", max_tokens=200, temperature=0, stream=True,
                                     logit_bias=no_eos(llama))
            next(iter(s))
            streams.append(s)
        waiting = {}

        def wait_in_queue():
            try:
                c.completions.create(model="tiny", prompt="Wait", max_tokens=2)
            except openai.APIStatusError as e:
                waiting["status"] = e.status_code
                waiting["retry"] = e.response.headers.get("retry-after")
            hold.set()
        t = threading.Thread(target=wait_in_queue)
        t.start()
        time.sleep(0.3)  # it is in the queue now
        t0 = time.time()
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="Full", max_tokens=2)
        assert time.time() - t0 < 0.5  # at once
        assert e.value.body["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        assert hold.wait(5)
        assert waiting == {"status": 503, "retry": "1"}
        for s in streams:
            s.close()
        wait_until(lambda: not batch._active)
        assert c.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices  # and it serves again
    finally:
        stop()


def test_sixty_four_clients_with_random_disconnects(model_path, reference):
    """64 clients at once against 8 slots, streaming or not, greedy or seeded, with stop strings,
    logprobs and JSON schemas; a third of them go away mid-answer. Every answer that completes is
    the one Llama gives that request alone, none mixed with another's; the server stays up, its
    queue empties and every slot is free at the end."""
    llama, batch, url, stop = start(model_path, 8, queue_size=64)
    try:
        rng = random.Random(5)
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        cases = []
        for i in range(64):
            kw = dict(max_tokens=rng.randint(4, 30), temperature=rng.choice([0.0, 0.7]), seed=i)
            if i % 5 == 0 and i % 9:
                kw["stop"] = ["o", "e "]
            if i % 7 == 0:
                kw.update(logprobs=True, top_logprobs=2)
            if i % 9 == 0:
                kw.update(max_tokens=40, response_format={"type": "json_schema",
                                                          "json_schema": {"name": "a", "schema": schema}})
            cases.append((i, kw, rng.random() < 0.5, rng.randint(0, 3) if rng.random() < 0.33 else None))
        want = {i: reference.create_chat_completion(messages(i), **kw)["choices"][0] for i, kw, _, _ in cases}
        c = client(url)

        def run(case):
            i, kw, stream, vanish = case
            if vanish is not None:  # reads a few lines (or none) and closes the connection
                with httpx.Client(timeout=60) as h:
                    body = {"model": "tiny", "messages": messages(i), "stream": True, **kw}
                    with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        for _ in zip(range(vanish), r.iter_lines()):
                            pass
                return i, None
            if stream:
                chunks = list(c.chat.completions.create(model="tiny", messages=messages(i), stream=True, **kw))
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                return i, (text, chunks[-1].choices[0].finish_reason, None)
            r = c.chat.completions.create(model="tiny", messages=messages(i), **kw)
            lp = r.choices[0].logprobs
            return i, (r.choices[0].message.content, r.choices[0].finish_reason,
                       None if lp is None else [(t.token, t.logprob) for t in lp.content])
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            got = dict(pool.map(run, cases))
        for i, kw, stream, vanish in cases:
            if vanish is not None:
                continue
            text, finish, logprobs = got[i]
            assert text == want[i]["message"]["content"], f"request {i}"
            assert finish == want[i]["finish_reason"], f"request {i}"
            if logprobs is not None:
                assert logprobs == [(t["token"], t["logprob"]) for t in want[i]["logprobs"]["content"]]
            if "response_format" in kw and finish == "stop":
                assert json.loads(text) in ({"ok": True}, {"ok": False})
        wait_until(lambda: not batch._active)
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        assert not batch._pending
        assert threading.active_count() < 200  # worker threads went back to the pool
    finally:
        stop()


def test_kv_budget_shares_positions_between_slots(reference):
    per_position = 2 * 2 * 2 * 32 * 2  # K and V x layers x kv heads x head_dim x f16 bytes
    assert batch_n_ctx(reference, 4, 4 * 100 * per_position / (1 << 20)) == 100
    assert batch_n_ctx(reference, 4, None) == N_CTX
    assert batch_n_ctx(reference, 1, 1024) == N_CTX  # never more than the Llama's context
    with pytest.raises(ValueError, match="at least 64"):
        batch_n_ctx(reference, 4, 4 * 10 * per_position / (1 << 20))
