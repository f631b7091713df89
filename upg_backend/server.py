"""An OpenAI-compatible HTTP server over one `Llama` (FastAPI + uvicorn + sse-starlette).

Requests run on contexts: the `Llama` itself (one request at a time), or the n slots of a `Batch`
(`--parallel N`: n requests at once, their tokens evaluated together in one pass per step,
upg_backend/batch.py). A request waits in a bounded queue for a free context: past `queue_size`
waiting it is answered 429 at once, and after `queue_timeout` seconds of waiting 503. Generation
runs in worker threads so the event loop keeps serving (health checks, queued clients, disconnect
detection). A client that disconnects, streaming or not, stops its generation at the next token and
its context is free at once. Request bodies past `max_body_bytes` are refused with 413 before they
are read.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
import threading
import time
from typing import Any, Callable, Iterator, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from . import responses
from .batch import Batch
from .llama import Llama
from .responses import ResponsesRequest
from .sampling import SamplingParams

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "seed")
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is answered 413 unread
MAX_CHOICES = 16          # the most `n` (times prompts) one request may ask for
QUEUE_SIZE = 64           # requests that may wait for a context; more are answered 429
QUEUE_TIMEOUT = 600.0     # seconds a request may wait for a context before it is answered 503


class _Request(BaseModel):
    """Fields shared by completions and chat completions (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams.from_kwargs(**{k: getattr(self, k) for k in _SAMPLING_FIELDS})


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    special: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


class _BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, at once when Content-Length says so,
    else as soon as that many bytes have come (the rest is never read)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, message, code="request_too_large")(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            chunk = await receive()
            seen += len(chunk.get("body", b""))
            if seen > self.limit:  # FastAPI passes HTTPExceptions from reading the body on to http_error
                raise HTTPException(413, message)
            return chunk
        await self.app(scope, limited, send)


class _Contexts:
    """The contexts requests run on (the Llama, or a Batch's views) and the queue for them."""

    def __init__(self, llama: Llama, batch: Batch | None, queue_size: int, queue_timeout: float):
        self.batch, self.queue_size, self.queue_timeout = batch, queue_size, queue_timeout
        self.free: asyncio.Queue[Llama] = asyncio.Queue()
        for view in batch.views if batch else [llama]:
            self.free.put_nowait(view)
        self.waiting = 0
        self.embed_lock = asyncio.Lock()  # the Llama itself embeds, beside a Batch's views

    async def acquire(self) -> _Lease:
        if self.free.empty() and self.waiting >= self.queue_size:
            raise HTTPException(429, f"the server is busy: {self.waiting} requests are waiting; retry later")
        self.waiting += 1
        try:
            view = await asyncio.wait_for(self.free.get(), self.queue_timeout)
        except TimeoutError:
            raise HTTPException(503, f"no context became free in {self.queue_timeout:g} s; retry later") from None
        finally:
            self.waiting -= 1
        if self.batch:
            self.batch.acquire(view)
        return _Lease(self, view, asyncio.get_running_loop())


class _Lease:
    """A context held by one request; release() (once, from any thread, or when the lease is
    collected unreleased: a stream that never started) gives it back."""

    def __init__(self, contexts: _Contexts, view: Llama, loop: asyncio.AbstractEventLoop):
        self.contexts, self.view, self.loop = contexts, view, loop
        self._lock, self._done = threading.Lock(), False

    def release(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if self.contexts.batch:
            self.contexts.batch.release(self.view)  # the scheduler stops waiting for this slot now
        self.loop.call_soon_threadsafe(self.contexts.free.put_nowait, self.view)

    def __del__(self) -> None:
        if not self._done and not self.loop.is_closed():
            self.release()


def create_app(llama: Llama, *, model_name: str | None = None, api_key: str | None = None,
               aliases: tuple[str, ...] = (), max_body_bytes: int = MAX_BODY_BYTES, batch: Batch | None = None,
               queue_size: int = QUEUE_SIZE, queue_timeout: float = QUEUE_TIMEOUT) -> FastAPI:
    """The FastAPI application serving `llama`.

    Args:
        llama: the model; the app owns its use from now on (requests run one at a time on it,
            unless `batch` is given).
        batch: a Batch over llama: requests run on its views, n_parallel at once.
        queue_size: requests that may wait for a context; one more is answered 429.
        queue_timeout: seconds a request may wait for a context before it is answered 503.
        model_name: the id clients see in /v1/models and responses (default: the file name).
        api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <api_key>`.
        aliases: more model names requests may use; any other name is answered 404.
        max_body_bytes: request bodies larger than this are answered 413 unread.
    """
    name = model_name or llama.model_path.rsplit("/", 1)[-1].removesuffix(".upg")
    names = {name, *aliases}
    created = int(time.time())
    contexts = _Contexts(llama, batch, queue_size, queue_timeout)
    app = FastAPI(title="upg-backend", description="OpenAI-compatible API for a local UPG model")
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "invalid or missing API key")

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise HTTPException(404, f"the model {model!r} does not exist; this server serves {', '.join(sorted(names))}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {401: "invalid_api_key", 404: "model_not_found" if "model" in str(e.detail) else None,
                413: "request_too_large", 429: "queue_full", 503: "queue_timeout"}.get(e.status_code)
        response = _error(e.status_code, str(e.detail),
                          "invalid_request_error" if e.status_code < 500 else "server_error", code)
        if e.status_code in (429, 503):
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return _error(400, detail or "invalid request")

    @app.exception_handler(ValueError)
    async def value_error(request: Request, e: ValueError) -> JSONResponse:
        return _error(400, str(e))

    async def respond(start: Callable[[Llama, Any], Any], request: Request, stream: bool,
                      named_events: bool = False) -> Any:
        """Runs a request on a context: `start(llama, stopping_criteria)` validates and returns the
        result (or the chunk iterator). `named_events`: the chunks are Responses API events, sent
        under their type's name."""
        lease = await contexts.acquire()
        if not stream:
            gone = threading.Event()  # the client disconnected: generation stops at the next token

            async def watch() -> None:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.05)
                gone.set()

            watcher = asyncio.create_task(watch())
            try:
                result = await anyio.to_thread.run_sync(start, lease.view, [lambda ids, logits: gone.is_set()])
            finally:
                watcher.cancel()
                lease.release()
            result["model"] = name
            return result
        try:  # validation only: generation starts on the first next()
            chunks: Iterator[dict[str, Any]] = start(lease.view, None)
        except BaseException:
            lease.release()
            raise

        async def events() -> Any:
            done = object()
            try:
                while not await request.is_disconnected():
                    try:
                        chunk = await anyio.to_thread.run_sync(next, chunks, done)
                    except ValueError as e:  # found only once generating: the stream ends with it
                        yield {"data": json.dumps({"error": {"message": str(e), "type": "invalid_request_error",
                                                             "param": None, "code": None}})}
                        return
                    if chunk is done:
                        if not named_events:  # the Responses API's stream just ends
                            yield {"data": "[DONE]"}
                        return
                    if named_events:
                        yield {"event": chunk["type"], "data": json.dumps(chunk, ensure_ascii=False)}
                        continue
                    chunk["model"] = name
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
            finally:
                chunks.close()  # only after the worker thread has returned (to_thread waits on cancel)
                lease.release()
        return EventSourceResponse(events(), ping=15)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "upg-backend"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card(model_id)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        sampling, prompts = body.sampling(), body.prompts()
        if len(prompts) * body.n > MAX_CHOICES:
            raise ValueError(f"prompts times n is {len(prompts) * body.n}; at most {MAX_CHOICES} choices per request")
        if not prompts:
            raise ValueError("prompt is an empty list")

        def one(llm: Llama, i: int, criteria: Any, stream: bool, usage: bool) -> Any:
            return llm.create_completion(
                prompts[i // body.n], suffix=body.suffix, max_tokens=body.max_tokens, stop=body.stop, stream=stream,
                echo=body.echo, logprobs=body.logprobs, response_format=body.response_format,
                stopping_criteria=criteria, sampling=_nth(sampling, i), stream_options={"include_usage": usage})
        return await respond(_choices(one, len(prompts) * body.n, body.n, body.stream, body.stream_options),
                             request, body.stream)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        sampling = body.sampling()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        messages = [m.model_dump(exclude_none=True) for m in body.messages]

        def one(llm: Llama, i: int, criteria: Any, stream: bool, usage: bool) -> Any:
            return llm.create_chat_completion(
                messages, functions=body.functions, function_call=body.function_call, tools=body.tools,
                tool_choice=body.tool_choice, max_tokens=max_tokens, stop=body.stop, stream=stream,
                logprobs=body.logprobs, top_logprobs=body.top_logprobs, response_format=body.response_format,
                stopping_criteria=criteria, sampling=_nth(sampling, i), stream_options={"include_usage": usage})
        return await respond(_choices(one, body.n, body.n, body.stream, body.stream_options), request, body.stream)

    @app.post("/v1/responses", dependencies=[Depends(check_key)])
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        check_model(body.model)
        messages = body.messages()
        sampling = SamplingParams.from_kwargs(temperature=body.temperature, top_p=body.top_p)

        def start(llm: Llama, criteria: Any) -> Any:
            result = llm.create_chat_completion(messages, max_tokens=body.max_output_tokens, stream=body.stream,
                                                  stopping_criteria=criteria, sampling=sampling,
                                                  stream_options={"include_usage": True})
            return responses.events(result, name) if body.stream else responses.from_chat(result, name)
        return await respond(start, request, body.stream, named_events=True)

    @app.post("/v1/embeddings", dependencies=[Depends(check_key)])
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        check_model(body.model)
        if llama.pooling == "none":
            raise ValueError("this server's model embeds each token (pooling_type none); /v1/embeddings returns "
                             "one vector per input")
        if body.dimensions is not None and body.dimensions != llama.n_embd():
            raise ValueError(f"this model's embeddings have {llama.n_embd()} dimensions, not {body.dimensions}")
        inputs = [body.input] if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)) \
            else list(body.input)
        if not inputs:
            raise ValueError("input is an empty list")
        def run() -> list:
            return [llama.embed(x, return_count=True) for x in inputs]
        if batch is not None:  # the Llama's own session embeds; the views generate
            async with contexts.embed_lock:
                result = await anyio.to_thread.run_sync(run)
        else:
            lease = await contexts.acquire()
            try:
                result = await anyio.to_thread.run_sync(run)
            finally:
                lease.release()
        data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
                for i, (vector, _) in enumerate(result)]
        count = sum(n for _, n in result)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": count, "total_tokens": count}}

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(body: TokenizeRequest) -> dict[str, list[int]]:
        return {"tokens": llama.tokenize(body.content.encode("utf-8"), add_bos=body.add_special, special=body.special)}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        if any(not 0 <= t < llama.n_vocab() for t in body.tokens):
            raise ValueError(f"token ids must be in 0..{llama.n_vocab() - 1}")
        return {"content": llama.detokenize(body.tokens).decode("utf-8", errors="replace")}

    return app


def _nth(sampling: SamplingParams, i: int) -> SamplingParams:
    # a request's seed starts the first choice; the others go on with the same random stream
    return sampling if i == 0 else dataclasses.replace(sampling, seed=None)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _choices(one: Callable[[Llama, int, Any, bool, bool], Any], count: int, n: int, stream: bool,
             stream_options: dict | None) -> Callable[[Llama, Any], Any]:
    """`start` for `respond` over `count` choices (n per prompt) made one after another by
    `one(llama, i, criteria, stream, include_usage)`: one response with every choice (index i) and the
    usage added up (each prompt counted once), or their chunks in turn, ending with one usage chunk
    for them all when stream_options asks for it."""
    include_usage = bool((stream_options or {}).get("include_usage"))

    def add(total: dict[str, int], i: int, usage: dict[str, int]) -> None:
        total["prompt_tokens"] += usage["prompt_tokens"] if i % n == 0 else 0
        total["completion_tokens"] += usage["completion_tokens"]
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]

    def start(llm: Llama, criteria: Any) -> Any:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if stream:
            first = one(llm, 0, criteria, True, include_usage)  # validates the request before the response starts

            def chunks() -> Iterator[dict[str, Any]]:
                last = None
                for i in range(count):
                    for chunk in first if i == 0 else one(llm, i, criteria, True, include_usage):
                        if not chunk["choices"]:  # one choice's usage: added to the total
                            add(total, i, chunk["usage"])
                            last = chunk
                            continue
                        for choice in chunk["choices"]:
                            choice["index"] = i
                        yield chunk
                if last is not None:
                    yield {**last, "usage": total}
            return chunks()
        results = []
        for i in range(count):
            result = one(llm, i, criteria, False, False)
            result["choices"][0]["index"] = i
            add(total, i, result["usage"])
            results.append(result)
            if criteria and criteria[0](None, None):
                break  # the client is gone
        return {**results[0], "choices": [r["choices"][0] for r in results], "usage": total}
    return start


def serve(llama: Llama, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, aliases: tuple[str, ...] = (), log_level: str = "info", parallel: int = 1,
          kv_budget_mib: float | None = None, queue_size: int = QUEUE_SIZE, queue_timeout: float = QUEUE_TIMEOUT,
          prefill_chunk: int = 32, generated: str = "matvec") -> None:
    """Serves `llama` until interrupted (127.0.0.1 by default: pass host="0.0.0.0" to expose it).

    parallel > 1: a Batch of that many slots (requests at once), each of llama's n_ctx positions,
    or of kv_budget_mib MiB of KV cache shared out between them; generated: the Batch's CUDA kernels
    of the generated tokens (Batch)."""
    import uvicorn

    batch = None
    if parallel > 1:
        n_ctx = batch_n_ctx(llama, parallel, kv_budget_mib)
        batch = Batch(llama, parallel, n_ctx=n_ctx, prefill_chunk=prefill_chunk, generated=generated)
    app = create_app(llama, model_name=model_name, api_key=api_key, aliases=aliases, batch=batch,
                     queue_size=queue_size, queue_timeout=queue_timeout)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        if batch:
            batch.close()


def batch_n_ctx(llama: Llama, parallel: int, kv_budget_mib: float | None) -> int:
    """Positions per slot: llama's n_ctx, or what kv_budget_mib MiB of KV cache give each of the
    parallel slots (ValueError when that is less than 64)."""
    from .batch import kv_bytes_per_position

    if kv_budget_mib is None:
        return llama.n_ctx()
    per_slot = int(kv_budget_mib * (1 << 20)) // (parallel * kv_bytes_per_position(llama))
    if per_slot < 64:
        raise ValueError(f"a KV budget of {kv_budget_mib:g} MiB gives each of {parallel} slots {per_slot} positions; "
                         "at least 64 are needed")
    return min(per_slot, llama.n_ctx())
