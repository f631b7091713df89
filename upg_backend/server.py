"""An OpenAI-compatible HTTP server over one `Llama` (FastAPI + uvicorn + sse-starlette).

One model, one session: requests take turns through an asyncio lock, and each generation step
runs in a worker thread so the event loop keeps serving (health checks, queued clients,
disconnect detection). A client that disconnects, streaming or not, stops its generation at the next
token. Request bodies past `max_body_bytes` are refused with 413 before they are read.
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
from .llama import Llama
from .responses import ResponsesRequest
from .sampling import SamplingParams

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "seed")
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is answered 413 unread
MAX_CHOICES = 16          # the most `n` (times prompts) one request may ask for


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


def create_app(llama: Llama, *, model_name: str | None = None, api_key: str | None = None,
               aliases: tuple[str, ...] = (), max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving `llama`.

    Args:
        llama: the model; the app owns its use from now on (requests are serialized).
        model_name: the id clients see in /v1/models and responses (default: the file name).
        api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <api_key>`.
        aliases: more model names requests may use; any other name is answered 404.
        max_body_bytes: request bodies larger than this are answered 413 unread.
    """
    name = model_name or llama.model_path.rsplit("/", 1)[-1].removesuffix(".upg")
    names = {name, *aliases}
    created = int(time.time())
    lock = asyncio.Lock()
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
                413: "request_too_large"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                      code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return _error(400, detail or "invalid request")

    @app.exception_handler(ValueError)
    async def value_error(request: Request, e: ValueError) -> JSONResponse:
        return _error(400, str(e))

    async def respond(start: Callable[[Any], Any], request: Request, stream: bool, named_events: bool = False) -> Any:
        """Runs a request: `start(stopping_criteria)` validates and returns the result (or the chunk
        iterator). `named_events`: the chunks are Responses API events, sent under their type's name."""
        if not stream:
            gone = threading.Event()  # the client disconnected: generation stops at the next token

            async def watch() -> None:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.05)
                gone.set()

            async with lock:
                watcher = asyncio.create_task(watch())
                try:
                    result = await anyio.to_thread.run_sync(start, [lambda ids, logits: gone.is_set()])
                finally:
                    watcher.cancel()
            result["model"] = name
            return result
        chunks: Iterator[dict[str, Any]] = start(None)  # validation only: generation starts on the first next()

        async def events() -> Any:
            done = object()
            try:
                async with lock:
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

        def one(i: int, criteria: Any, stream: bool, usage: bool) -> Any:
            return llama.create_completion(
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

        def one(i: int, criteria: Any, stream: bool, usage: bool) -> Any:
            return llama.create_chat_completion(
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

        def start(criteria: Any) -> Any:
            result = llama.create_chat_completion(messages, max_tokens=body.max_output_tokens, stream=body.stream,
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
        async with lock:
            result = await anyio.to_thread.run_sync(lambda: [llama.embed(x, return_count=True) for x in inputs])
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


def _choices(one: Callable[[int, Any, bool, bool], Any], count: int, n: int, stream: bool,
             stream_options: dict | None) -> Callable[[Any], Any]:
    """`start` for `respond` over `count` choices (n per prompt) made one after another by
    `one(i, criteria, stream, include_usage)`: one response with every choice (index i) and the
    usage added up (each prompt counted once), or their chunks in turn, ending with one usage chunk
    for them all when stream_options asks for it."""
    include_usage = bool((stream_options or {}).get("include_usage"))

    def add(total: dict[str, int], i: int, usage: dict[str, int]) -> None:
        total["prompt_tokens"] += usage["prompt_tokens"] if i % n == 0 else 0
        total["completion_tokens"] += usage["completion_tokens"]
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]

    def start(criteria: Any) -> Any:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if stream:
            first = one(0, criteria, True, include_usage)  # validates the request before the response starts

            def chunks() -> Iterator[dict[str, Any]]:
                last = None
                for i in range(count):
                    for chunk in first if i == 0 else one(i, criteria, True, include_usage):
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
            result = one(i, criteria, False, False)
            result["choices"][0]["index"] = i
            add(total, i, result["usage"])
            results.append(result)
            if criteria and criteria[0](None, None):
                break  # the client is gone
        return {**results[0], "choices": [r["choices"][0] for r in results], "usage": total}
    return start


def serve(llama: Llama, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, aliases: tuple[str, ...] = (), log_level: str = "info") -> None:
    """Serves `llama` until interrupted (127.0.0.1 by default: pass host="0.0.0.0" to expose it)."""
    import uvicorn

    uvicorn.run(create_app(llama, model_name=model_name, api_key=api_key, aliases=aliases), host=host, port=port,
                log_level=log_level)
