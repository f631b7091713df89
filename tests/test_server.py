"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""
from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from chat_model import SERVER_N_CTX as N_CTX, model_path, reference  # noqa: F401 (fixtures)
from conftest import serve_app
from upg_backend.batch import Batch
from upg_backend.llama import Llama
from upg_backend.server import create_app

API_KEY = "test-key"


@pytest.fixture(scope="module", params=["one", "batch"])
def server(model_path, request):
    """The server on the Llama itself, and on a Batch of 4 slots (every test runs on both)."""
    llama = Llama(model_path, n_ctx=N_CTX, n_threads=1)
    batch = Batch(llama, 4) if request.param == "batch" else None
    srv, thread, url = serve_app(create_app(llama, model_name="tiny", api_key=API_KEY, batch=batch))
    yield llama, url
    srv.should_exit = True
    thread.join(10)
    if batch:
        batch.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=API_KEY, max_retries=0)


def http(url: str, body: dict | None = None, key: str | None = API_KEY) -> tuple[int, dict]:
    """A plain HTTP request (stdlib only): (status, parsed JSON body)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}: how are you?"}]


def test_health_and_models(server, client):
    assert http(server[1] + "/health", key=None) == (200, {"status": "ok"})
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_chat_matches_in_process_and_streaming(client, reference):
    want = reference.create_chat_completion(chat_messages(0), max_tokens=24, temperature=0)
    got = client.chat.completions.create(model="tiny", messages=chat_messages(0), max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    chunks = list(client.chat.completions.create(model="tiny", messages=chat_messages(0), max_tokens=24,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == got.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_completions_streamed_and_not(client, reference):
    want = reference.create_completion("Hello world", max_tokens=12, temperature=0)["choices"][0]
    got = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0)
    assert got.choices[0].text == want["text"]
    stream = client.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want["text"]


def test_sixteen_concurrent_streaming_clients(client, reference):
    want = {i: reference.create_chat_completion(chat_messages(i), max_tokens=16, temperature=0)
            ["choices"][0]["message"]["content"] for i in range(16)}

    def run(i: int) -> str:
        stream = client.chat.completions.create(model="tiny", messages=chat_messages(i), max_tokens=16,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = dict(zip(range(16), pool.map(run, range(16))))
    assert got == want
    assert len(set(want.values())) > 1  # the prompts really lead to different answers


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hello world " * N_CTX, max_tokens=4)
    assert "context window" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * N_CTX}], stream=True)


def test_bad_parameters_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=chat_messages(0), temperature=-1)
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=chat_messages(0), response_format={"type": "xml"})


def test_json_response_format(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    got = client.chat.completions.create(
        model="tiny", messages=chat_messages(1), max_tokens=60, temperature=0.8, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert got.choices[0].finish_reason == "stop"
    assert json.loads(got.choices[0].message.content) in ({"ok": True}, {"ok": False})


def test_tokenize_detokenize(server, reference):
    status, body = http(server[1] + "/tokenize", {"content": "Hello wörld"})
    assert status == 200 and body["tokens"] == reference.tokenize("Hello wörld".encode())
    assert http(server[1] + "/detokenize", {"tokens": body["tokens"]}) == (200, {"content": "Hello wörld"})
    status, body = http(server[1] + "/detokenize", {"tokens": [10**6]})
    assert status == 400 and "token ids" in body["error"]["message"]
    assert http(server[1] + "/tokenize", {"content": "x"}, key=None)[0] == 401


def slow_evals(monkeypatch) -> list[int]:
    """Makes every eval (of the Llama and of a Batch's views) take a while, so that a disconnect
    lands mid-generation; returns the list each eval appends its token count to."""
    counts: list[int] = []
    real_eval = Llama._eval

    def slow_eval(self, tokens, generated):
        time.sleep(0.02)
        counts.append(len(tokens))
        real_eval(self, tokens, generated)

    monkeypatch.setattr(Llama, "_eval", slow_eval)
    return counts


def test_non_streamed_client_disconnect_stops_generation(server, client, monkeypatch):
    llama, url = server
    counts = slow_evals(monkeypatch)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 200, "temperature": 0,
            "logit_bias": {str(t): -100 for t in llama._eos_ids}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(OSError):  # the client gives up (a timeout) and closes the connection
        urllib.request.urlopen(request, timeout=0.5)
    time.sleep(0.5)
    n_after_close = len(counts)
    time.sleep(0.5)
    assert len(counts) == n_after_close  # nothing more is generated
    assert n_after_close < 100  # far from the 200 tokens asked for
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0).choices


def test_client_disconnect_stops_generation(server, client, monkeypatch):
    llama = server[0]
    counts = slow_evals(monkeypatch)
    messages = [{"role": "user", "content": "Tell me a long story."}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=200, temperature=0,
                                            logit_bias={str(t): -100 for t in llama._eos_ids}, stream=True)
    it = iter(stream)
    for _ in range(4):
        next(it)
    stream.close()
    time.sleep(0.5)
    n_after_close = len(counts)
    time.sleep(0.5)
    assert len(counts) == n_after_close  # nothing more is generated
    assert n_after_close < 150  # far from the 200 tokens asked for
    # and the model is free for the next client
    got = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length")
