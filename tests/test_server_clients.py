"""The server as OpenAI's client (and LangChain's ChatOpenAI) uses it, on the built-in model: tools,
tool histories, content parts, n, streaming usage, embeddings, the Responses API, model names, list
prompts; and as a hostile client uses it: oversized bodies answered 413 at once, and a fuzzed
request schema never answered 5xx."""
from __future__ import annotations

import base64
import json
import re
import socket
import time
from typing import Literal

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from conftest import serve_app
from upg_backend.llama import Llama
from upg_backend.server import create_app

NAME = "builtin"
LIMIT = 64 << 10
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                   "required": ["a", "b"]}}}
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def start_server(llama: Llama, **kwargs):
    return serve_app(create_app(llama, model_name=NAME, **kwargs))


@pytest.fixture(scope="module")
def reference():
    return Llama(n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def server():
    srv, thread, url = start_server(Llama(n_ctx=1024, n_threads=1), aliases=("phi",), max_body_bytes=LIMIT)
    yield url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def test_tool_calls_over_http(client):
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        got = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[ADD], tool_choice=choice,
                                             temperature=0.7, seed=1, max_tokens=100)
        assert got.choices[0].finish_reason == "tool_calls"
        call = got.choices[0].message.tool_calls[0]
        assert call.type == "function" and call.function.name == "add" and call.id
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    none = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[ADD], tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None
    stream = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[ADD], tool_choice="required",
                                            temperature=0.7, seed=1, max_tokens=100, stream=True)
    deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0][0].function.name == "add"


def test_tool_history_with_null_content(client, reference):
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    got = client.chat.completions.create(model=NAME, messages=history, tools=[ADD], temperature=0, max_tokens=12)
    want = reference.create_chat_completion(history, tools=[ADD], temperature=0, max_tokens=12)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]


def test_content_parts_n_and_usage_chunk(client, reference):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]}]
    got = client.chat.completions.create(model=NAME, messages=parts, temperature=0, max_tokens=12)
    want = reference.create_chat_completion(QUESTION, temperature=0, max_tokens=12)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    two = client.chat.completions.create(model=NAME, messages=QUESTION, n=2, temperature=1.0, seed=4, max_tokens=12)
    # the seed starts the first choice, the second goes on with the same random stream
    first = reference.create_chat_completion(QUESTION, temperature=1.0, seed=4, max_tokens=12)
    second = reference.create_chat_completion(QUESTION, temperature=1.0, max_tokens=12)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [r["choices"][0]["message"]["content"] for r in (first, second)]
    assert two.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert two.usage.completion_tokens == first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"]
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, n=2, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == 2 * want["usage"]["completion_tokens"]
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == want["choices"][0]["message"]["content"]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_list_prompts(client, reference):
    prompts = ["Hello", "The capital of France is"]
    got = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    want = [reference(p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.text for c in got.choices] == [w["choices"][0]["text"] for w in want for _ in range(2)]
    assert got.usage.prompt_tokens == sum(w["usage"]["prompt_tokens"] for w in want)
    stream = list(client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices and c.choices[0].index == 1) == \
        want[1]["choices"][0]["text"]
    assert stream[-1].usage.completion_tokens == sum(w["usage"]["completion_tokens"] for w in want)


def test_json_object_is_an_object(client):
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Reply in JSON."}],
                                         response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    assert got.choices[0].message.content.startswith('{"')  # an object with a member, not "{ }"


def test_embeddings(client, reference):
    got = client.embeddings.create(model=NAME, input=["Hello world", "a cat"])  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1]
    np.testing.assert_allclose(got.data[1].embedding, reference.embed("a cat"), rtol=1e-6)
    plain = httpx.post(str(client.base_url) + "embeddings", json={"model": NAME, "input": "Hello world",
                                                                 "encoding_format": "float"}).json()
    np.testing.assert_allclose(plain["data"][0]["embedding"], got.data[0].embedding, rtol=1e-6)
    raw = httpx.post(str(client.base_url) + "embeddings", json={"input": [1, 2, 3], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, reference.embed([1, 2, 3]), rtol=1e-6)
    assert got.usage.prompt_tokens == sum(len(reference.tokenize(t.encode())) for t in ["Hello world", "a cat"])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=NAME, input="x", dimensions=3)


class City(BaseModel):
    """A city and whether it is a capital."""

    name: Literal["Paris", "Rome", "Oslo"]
    capital: bool


def test_langchain_openai(server, reference):
    """LangChain's ChatOpenAI (langchain-openai) pointed at the server: invoke, stream, tools and
    structured output (its default, OpenAI's strict json_schema response format)."""
    chat = ChatOpenAI(base_url=server + "/v1", api_key="none", model=NAME, temperature=0, max_tokens=16,
                      max_retries=0)
    want = reference.create_chat_completion(QUESTION, temperature=0, max_tokens=16)["choices"][0]["message"]
    assert chat.invoke("What is 2 + 3?").content == want["content"]
    assert "".join(c.content for c in chat.stream("What is 2 + 3?")) == want["content"]
    roomy = ChatOpenAI(base_url=server + "/v1", api_key="none", model=NAME, max_tokens=128, max_retries=0, seed=1)
    call = roomy.bind_tools([ADD], tool_choice="add").invoke("What is 2 + 3?").tool_calls[0]
    assert call["name"] == "add"
    jsonschema.validate(call["args"], ADD["function"]["parameters"])
    city = roomy.with_structured_output(City).invoke("Name a capital city.")
    assert isinstance(city, City)


def test_responses_api(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    want = reference.create_chat_completion(messages, temperature=0, max_tokens=16)
    got = client.responses.create(model=NAME, instructions="Be brief.", input="What is 2 + 3?", temperature=0,
                                  max_output_tokens=16)
    assert got.output_text == want["choices"][0]["message"]["content"] and got.status == "completed"
    assert got.usage.input_tokens == want["usage"]["prompt_tokens"]
    assert got.usage.output_tokens == want["usage"]["completion_tokens"]
    parts = client.responses.create(model=NAME, temperature=0, max_output_tokens=16, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2 + 3?"}]}])
    assert parts.output_text == got.output_text
    events = list(client.responses.create(model=NAME, instructions="Be brief.", input="What is 2 + 3?",
                                          temperature=0, max_output_tokens=16, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == got.output_text
    assert events[-1].response.output_text == got.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    short = client.responses.create(model=NAME, input="Tell me a story.", max_output_tokens=2)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.responses.create(model=NAME, input="x", tools=[{"type": "function", "name": "f", "parameters": {}}])


def test_model_names(client, server):
    assert client.models.retrieve(NAME).id == NAME and client.models.retrieve("phi").id == "phi"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert client.chat.completions.create(model="phi", messages=QUESTION, max_tokens=2).choices


def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[socket.socket, bytes]:
    """Sends raw bytes; returns the socket and the whole response (headers and body)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    try:
        s.sendall(head + body)
    except OSError:  # the server may answer and close before all of a refused body is sent
        pass
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            next(line.split(b":")[1] for line in answer.split(b"\r\n") if line.lower().startswith(b"content-length"))):
        data = s.recv(65536)
        if not data:
            break
        answer += data
    return s, answer


def test_oversized_bodies_are_413_at_once(server):
    # Content-Length over the limit: answered before a byte of the body is sent
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10 << 20}\r\n\r\n").encode()
    s, answer = raw_request(server, head)
    s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer
    # chunked, no length: refused once the limit is passed
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // 8192 + 2))
    s, answer = raw_request(server, head, body)
    s.close()
    assert answer.startswith(b"HTTP/1.1 413")


def test_health_answers_while_a_body_is_being_read(server):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    host, port = server.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=10)
    slow.sendall(head + b'{"messages": [')  # and then nothing: the server waits for the rest
    try:
        t0 = time.monotonic()
        assert httpx.get(server + "/health", timeout=5).json() == {"status": "ok"}
        assert time.monotonic() - t0 < 5
    finally:
        slow.close()


def test_a_text_longer_than_any_context_is_refused_before_it_is_tokenized(client):
    # 60 KB: at most 16 bytes a token in this vocabulary, so at least 3750 tokens, over n_ctx 1024
    huge = "word " * 12_000
    with pytest.raises(openai.BadRequestError, match="at least"):
        client.completions.create(model=NAME, prompt=huge, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="at least"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": huge}])
    got = client.embeddings.create(model=NAME, input=huge, encoding_format="float")
    assert got.usage.prompt_tokens == 1024  # cut to n_ctx, as llama-cpp-python's embed(truncate=True)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() |
                    st.text(max_size=12), lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=8)
BASES = {
    "/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/completions": {"model": NAME, "prompt": "Hi", "max_tokens": 2},
    "/v1/embeddings": {"model": NAME, "input": "Hi"},
    "/v1/responses": {"model": NAME, "input": "Hi", "max_output_tokens": 2},
}
FIELDS = ["model", "messages", "prompt", "input", "instructions", "max_output_tokens", "previous_response_id",
          "max_tokens", "max_completion_tokens", "stop", "stream",
          "stream_options", "n", "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
          "presence_penalty", "frequency_penalty", "logit_bias", "seed", "response_format", "tools", "tool_choice",
          "functions", "function_call", "logprobs", "top_logprobs", "echo", "suffix", "encoding_format", "dimensions"]
MESSAGE_FIELDS = ["role", "content", "tool_calls", "tool_call_id", "name"]
# values shaped almost like the real thing reach deeper than arbitrary JSON (grammars, tools, templates)
SCHEMA = st.recursive(st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "integer", "array", "x"]) | JSON}),
                      lambda inner: st.fixed_dictionaries({}, optional={
                          "type": st.sampled_from(["object", "array", "boolean"]) | JSON,
                          "properties": st.dictionaries(st.text(max_size=4), inner, max_size=3) | JSON,
                          "required": st.lists(st.text(max_size=4), max_size=2) | JSON,
                          "items": inner, "enum": JSON, "anyOf": st.lists(inner, max_size=2),
                          "$ref": st.sampled_from(["#/$defs/a", "#/x", "http://e"]), "minLength": JSON}), max_leaves=6)
TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function") | JSON, "function": st.fixed_dictionaries(
    {"name": st.text(max_size=5) | JSON}, optional={"parameters": SCHEMA | JSON, "description": JSON})}), max_size=3)
SHAPED = {
    "tools": TOOLS, "functions": TOOLS.map(lambda ts: [t["function"] for t in ts if isinstance(t["function"], dict)]),
    "tool_choice": st.sampled_from(["auto", "none", "required", "f"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=3) | JSON})}),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema", "text"]) | JSON},
                                             optional={"schema": SCHEMA | JSON,
                                                       "json_schema": st.fixed_dictionaries({"schema": SCHEMA | JSON})}),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "system", "x"])},
                                               optional={"content": st.text(max_size=8) | JSON | st.lists(
                                                   st.fixed_dictionaries({"type": st.just("text") | JSON,
                                                                          "text": st.text(max_size=5) | JSON})),
                                                         "tool_calls": st.lists(st.fixed_dictionaries(
                                                             {"type": st.just("function"), "function": JSON})),
                                                         }), max_size=3),
    "prompt": st.lists(st.integers(-5, 5000), max_size=4) | st.lists(st.lists(st.integers(-5, 3000), max_size=3)),
    "input": st.lists(st.integers(-5, 5000), max_size=4) | st.lists(st.text(max_size=5), max_size=3),
    "logit_bias": st.dictionaries(st.integers(-5, 10**6).map(str), st.floats(), max_size=3),
    "stop": st.lists(st.text(max_size=3), max_size=3),
}


@pytest.fixture(scope="module")
def fuzz_server():
    srv, thread, url = start_server(Llama(n_ctx=96, n_threads=1), max_body_bytes=LIMIT)
    with httpx.Client(base_url=url, timeout=60) as http:
        yield http
    srv.should_exit = True
    thread.join(10)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(sorted(BASES)), field=st.sampled_from(FIELDS), data=st.data(),
       in_message=st.sampled_from([None, *MESSAGE_FIELDS]), drop=st.booleans(), stream=st.booleans())
def test_fuzzed_requests_are_answered_4xx_with_a_message(fuzz_server, route, field, data, in_message, drop, stream):
    value = data.draw(JSON | SHAPED[field] if field in SHAPED else JSON)
    body = json.loads(json.dumps(BASES[route]))  # a deep copy
    if in_message and route == "/v1/chat/completions":
        message = body["messages"][0]
        message.pop(in_message, None) if drop else message.__setitem__(in_message, value)
    elif drop:
        body.pop(field, None)
    else:
        body[field] = value
    if stream and route != "/v1/embeddings":  # (the Responses API's stream has no [DONE])
        body.setdefault("stream", True)
    # Python's json writes NaN and Infinity, which Python's json (and so FastAPI) reads back
    r = fuzz_server.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
    if r.status_code == 200:
        if "text/event-stream" in r.headers.get("content-type", ""):
            if route == "/v1/responses":
                assert re.search(r"event: response\.(completed|incomplete)\r?\ndata: [^\n]*\s*$", r.text), r.text[-300:]
            else:
                assert r.text.rstrip().endswith("data: [DONE]")
            assert '"error": {' not in r.text
        else:
            assert r.json()["object"] in ("list", "text_completion", "chat.completion", "response")
    else:
        assert 400 <= r.status_code < 500, (r.status_code, body, r.text)
        assert r.json()["error"]["message"]
    assert fuzz_server.get("/health").status_code == 200


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"messages": "x"}', b"1e999999",
                                 b'{"model": "builtin", "messages": [{"role": "user", "content": 5}]}'])
def test_malformed_bodies_are_400(fuzz_server, raw):
    for route in BASES:
        r = fuzz_server.post(route, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], (route, raw, r.text)
