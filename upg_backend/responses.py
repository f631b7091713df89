"""OpenAI's Responses API (`POST /v1/responses`) over chat completions: text in, text out.

A request's `instructions` and `input` (a string, or messages whose content is a string or
`input_text` / `output_text` parts) become chat messages; the chat completion becomes one
`message` output item with one `output_text` part. Streaming sends the Responses API's events
(`response.created` ... `response.output_text.delta` ... `response.completed`). Tools, stored
responses (`previous_response_id`, `store`) and other item types are not supported: a request
that asks for them is a ValueError (400).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, Field

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    previous_response_id: str | None = None

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages the request stands for."""
        if self.tools:
            raise ValueError("/v1/responses serves text only; use /v1/chat/completions for tools")
        if self.previous_response_id is not None:
            raise ValueError("responses are not stored: previous_response_id is not supported (send the whole input)")
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        if not items:
            raise ValueError("input is empty")
        for item in items:
            if item.get("type", "message") != "message" or not isinstance(item.get("role"), str):
                raise ValueError(f"input items must be messages with a role, got {item!r}"[:300])
            content = item.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, Mapping) and p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str)
                           for p in content):
                    raise ValueError("message content parts must be input_text parts; this model reads text only")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ValueError("message content must be a string or a list of input_text parts")
            # the Responses API's "developer" role is the system prompt chat templates know
            out.append({"role": "system" if item["role"] == "developer" else item["role"], "content": content})
        return out


def _response(rid: str, model: str, created: int, status: str, text: str | None,
              usage: Mapping[str, int] | None, finish: str | None) -> dict[str, Any]:
    output = [] if text is None else [{
        "type": "message", "id": f"msg_{rid[5:]}", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    body: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "model": model, "status": status,
        "output": output, "parallel_tool_calls": False, "tool_choice": "auto", "tools": [], "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None}
    if usage is not None:
        body["usage"] = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                         "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                         "output_tokens_details": {"reasoning_tokens": 0}}
    return body


def from_chat(result: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A non-streamed chat completion as a Responses API response."""
    choice = result["choices"][0]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    return _response(f"resp_{uuid.uuid4().hex}", model, result["created"], status, choice["message"]["content"] or "",
                     result["usage"], choice["finish_reason"])


def events(chunks: Iterator[Mapping[str, Any]], model: str) -> Iterator[dict[str, Any]]:
    """Chat completion chunks (with a final usage chunk) as Responses API stream events."""
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    item = {"type": "message", "id": f"msg_{rid[5:]}", "status": "in_progress", "role": "assistant", "content": []}
    seq = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(seq), **fields}

    yield event("response.created", response=_response(rid, model, created, "in_progress", None, None, None))
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", item_id=item["id"], output_index=0, content_index=0, part=part)
    text, finish, usage = "", None, None
    for chunk in chunks:
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        choice = chunk["choices"][0]
        delta = choice["delta"].get("content")
        if delta:
            text += delta
            yield event("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                        delta=delta, logprobs=[])
        finish = choice.get("finish_reason") or finish
    yield event("response.output_text.done", item_id=item["id"], output_index=0, content_index=0, text=text,
                logprobs=[])
    yield event("response.content_part.done", item_id=item["id"], output_index=0, content_index=0,
                part={**part, "text": text})
    yield event("response.output_item.done", output_index=0, item={
        **item, "status": "completed", "content": [{**part, "text": text}]})
    status = "incomplete" if finish == "length" else "completed"
    yield event(f"response.{status}", response=_response(rid, model, created, status, text, usage, finish))
