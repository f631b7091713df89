"""An OpenAI-compatible HTTP server over one `Llama` (FastAPI + uvicorn + sse-starlette).

One model, one session: requests take turns through an asyncio lock, and each generation step
runs in a worker thread so the event loop keeps serving (health checks, queued clients,
disconnect detection). A client that disconnects, streaming or not, stops its generation at the next
token.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from typing import Any, Iterator

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .llama import Llama
from .sampling import SamplingParams

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "seed")


class _Request(BaseModel):
    """Fields shared by completions and chat completions (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="only one choice is supported")
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
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    special: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(llama: Llama, *, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `llama`.

    Args:
        llama: the model; the app owns its use from now on (requests are serialized).
        model_name: the id clients see in /v1/models and responses (default: the file name).
        api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <api_key>`.
    """
    name = model_name or llama.model_path.rsplit("/", 1)[-1].removesuffix(".upg")
    created = int(time.time())
    lock = asyncio.Lock()
    app = FastAPI(title="upg-backend", description="OpenAI-compatible API for a local UPG model")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "invalid or missing API key")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 401:
            return _error(401, str(e.detail), "invalid_request_error", "invalid_api_key")
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return _error(400, detail or "invalid request")

    @app.exception_handler(ValueError)
    async def value_error(request: Request, e: ValueError) -> JSONResponse:
        return _error(400, str(e))

    async def respond(start: Any, request: Request, stream: bool) -> Any:
        """Runs a request: `start(stopping_criteria)` validates and returns the result (or the chunk
        iterator)."""
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
                        chunk = await anyio.to_thread.run_sync(next, chunks, done)
                        if chunk is done:
                            yield {"data": "[DONE]"}
                            return
                        chunk["model"] = name
                        yield {"data": json.dumps(chunk, ensure_ascii=False)}
            finally:
                chunks.close()  # only after the worker thread has returned (to_thread waits on cancel)
        return EventSourceResponse(events(), ping=15)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "upg-backend"}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        sampling = body.sampling()
        return await respond(lambda criteria: llama.create_completion(
            body.prompt, max_tokens=body.max_tokens, stop=body.stop, stream=body.stream, echo=body.echo,
            logprobs=body.logprobs, response_format=body.response_format, stopping_criteria=criteria,
            sampling=sampling), request, body.stream)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        sampling = body.sampling()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(lambda criteria: llama.create_chat_completion(
            body.messages, max_tokens=max_tokens, stop=body.stop, stream=body.stream, logprobs=body.logprobs,
            top_logprobs=body.top_logprobs, response_format=body.response_format, tools=body.tools,
            stopping_criteria=criteria, sampling=sampling), request, body.stream)

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(body: TokenizeRequest) -> dict[str, list[int]]:
        return {"tokens": llama.tokenize(body.content.encode("utf-8"), add_bos=body.add_special, special=body.special)}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        if any(not 0 <= t < llama.n_vocab() for t in body.tokens):
            raise ValueError(f"token ids must be in 0..{llama.n_vocab() - 1}")
        return {"content": llama.detokenize(body.tokens).decode("utf-8", errors="replace")}

    return app


def serve(llama: Llama, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Serves `llama` until interrupted (127.0.0.1 by default: pass host="0.0.0.0" to expose it)."""
    import uvicorn

    uvicorn.run(create_app(llama, model_name=model_name, api_key=api_key), host=host, port=port, log_level=log_level)
