"""llama-cpp-python's `llama_chat_format`, as far as programs use it: a Jinja2 chat formatter and
the chat format names `Llama(chat_format=...)` takes besides the model file's own templates."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ..chat_template import CHAT_FORMATS, ChatTemplate


@dataclasses.dataclass
class ChatFormatterResponse:
    prompt: str
    stop: str | list[str] | None = None


class Jinja2ChatFormatter:
    """Renders messages with a Jinja2 chat template (as transformers does; upg_backend.chat_template)."""

    def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True,
                 stop_token_ids: Sequence[int] | None = None):
        self.template = ChatTemplate(template, {"eos_token": eos_token, "bos_token": bos_token})
        self.eos_token = eos_token
        self.add_generation_prompt = add_generation_prompt

    def __call__(self, *, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                 **kwargs: Any) -> ChatFormatterResponse:
        prompt = self.template.render(messages, add_generation_prompt=self.add_generation_prompt, tools=tools)
        return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token])


def list_chat_formats() -> list[str]:
    """The chat_format names that need no template in the model file."""
    return sorted(CHAT_FORMATS)
