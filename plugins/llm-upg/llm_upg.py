"""llm plugin: UPG models as llm models (`llm -m upg/NAME`), streaming, with system prompts,
conversations, options and JSON schemas."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import click
import llm
from pydantic import Field

_loaded: dict[tuple[str, int], Any] = {}  # (path, n_ctx) -> Llama: a model stays loaded for the process


def _registry() -> Path:
    return llm.user_dir() / "upg-models.json"


def _registered() -> dict[str, str]:
    path = _registry()
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(models: dict[str, str]) -> None:
    _registry().parent.mkdir(parents=True, exist_ok=True)
    _registry().write_text(json.dumps(models, indent=2))


@llm.hookimpl
def register_models(register):
    from upg_backend.builtin import BUILTIN_MODEL

    if BUILTIN_MODEL.is_file():
        register(UPGModel("upg", str(BUILTIN_MODEL)))
    for name, path in _registered().items():
        register(UPGModel(f"upg/{name}", path))


@llm.hookimpl
def register_commands(cli):
    @cli.group(name="upg")
    def upg_group():
        "Manage local UPG models"

    @upg_group.command(name="register")
    @click.argument("path", type=click.Path(exists=True, dir_okay=False, resolve_path=True))
    @click.option("--name", help="model name (default: the file name); the model id is upg/NAME")
    def register_model(path, name):
        "Register a .upg file as model upg/NAME"
        from upg_backend.plugin import backend

        if not backend.can_load(path):
            raise click.ClickException(f"{path} is not a UPG file")
        name = name or Path(path).stem
        models = _registered()
        models[name] = path
        _save(models)
        click.echo(f"registered upg/{name}")

    @upg_group.command(name="unregister")
    @click.argument("name")
    def unregister_model(name):
        "Forget model upg/NAME"
        models = _registered()
        if models.pop(name, None) is None:
            raise click.ClickException(f"no model upg/{name} is registered")
        _save(models)

    @upg_group.command(name="models")
    def list_models():
        "List the registered models"
        for name, path in _registered().items():
            click.echo(f"upg/{name}: {path}")


class UPGModel(llm.Model):
    can_stream = True
    supports_schema = True

    class Options(llm.Options):
        temperature: Optional[float] = Field(None, ge=0.0, description="sampling temperature; 0 is greedy")
        top_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="nucleus sampling mass")
        top_k: Optional[int] = Field(None, ge=0, description="sample from the k most likely tokens")
        min_p: Optional[float] = Field(None, ge=0.0, le=1.0, description="drop tokens below min_p x the best")
        repeat_penalty: Optional[float] = Field(None, gt=0.0, description="penalty on repeated tokens")
        max_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate at most")
        seed: Optional[int] = Field(None, description="sampler seed")
        n_ctx: Optional[int] = Field(None, ge=16, description="context length (default 4096)")

    def __init__(self, model_id: str, path: str):
        self.model_id = model_id
        self.path = path

    def __str__(self) -> str:
        return f"UPG: {self.model_id} ({self.path})"

    def _llama(self, n_ctx: int) -> Any:
        key = (self.path, n_ctx)
        if key not in _loaded:
            from upg_backend.llama import Llama

            _loaded[key] = Llama(self.path, n_ctx=n_ctx)
        return _loaded[key]

    def execute(self, prompt, stream, response, conversation) -> Iterator[str]:
        from upg_backend.sampling import SamplingParams

        from llm.parts import TextPart

        # prompt.messages is the whole chain (earlier turns of the conversation included)
        messages, system = [], None
        for message in prompt.messages:
            text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
            if message.role == "system":
                if text == system:  # llm repeats the system prompt with every turn
                    continue
                system = text
            messages.append({"role": message.role, "content": text})

        o = prompt.options
        sampling = SamplingParams.from_kwargs(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
                                              repeat_penalty=o.repeat_penalty, seed=o.seed)
        response_format = {"type": "json_object", "schema": prompt.schema} if prompt.schema else None
        llama = self._llama(o.n_ctx or 4096)
        chunks = llama.create_chat_completion(messages, max_tokens=o.max_tokens, stream=True, sampling=sampling,
                                              response_format=response_format)
        for chunk in chunks:
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                yield text
