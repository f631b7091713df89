"""Chat templates: Jinja2 rendering set up exactly as transformers' `apply_chat_template` does.

Templates come with model files, so they are untrusted code: they run in Jinja2's immutable sandbox,
and reaching for an unsafe attribute (`__class__`, `__globals__`, ...) is an error at once rather
than the silent empty string the sandbox would otherwise render.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# llama-cpp-python's `chat_format` names that work without a template in the model file
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_FORMATS = {"chatml": CHATML, "chatml-function-calling": CHATML}


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or tried to escape its sandbox."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` for templates without exposing the dict type itself
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    # namespaces refuse underscore names so templates cannot plant dunder attributes
    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only, so templates never see objects with dangerous methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic messages (OpenAI SDK, server requests)
        return _plain(value.model_dump(exclude_none=True))
    raise ChatTemplateError(f"chat messages may hold only JSON values, got a {type(value).__name__}")


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja2 template source.
        special_tokens: variables transformers passes from the tokenizer (`bos_token`, `eos_token`, ...).

    Raises:
        ChatTemplateError: the template does not compile.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        if not isinstance(source, str) or not source:
            raise ChatTemplateError("a chat template must be a non-empty string")
        if tuple(int(p) for p in jinja2.__version__.split(".")[:3]) < (3, 1, 6):
            raise ChatTemplateError(f"jinja2>=3.1.6 is needed (older versions have sandbox escapes), found {jinja2.__version__}")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from e
        # a template that reads `tools` renders tool lists, calls and results itself
        self.knows_tools = "tools" in jinja2.meta.find_undeclared_variables(self._template.environment.parse(source))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for a conversation, as transformers' `apply_chat_template(tokenize=False)`.

        Args:
            messages: dicts with `role` and `content` (and whatever else the template reads); keys
                whose value is None are dropped, as transformers does.
            add_generation_prompt: end with the header that opens the assistant's turn.
            tools: JSON schemas of the callable tools, for templates that describe them.
            **kwargs: extra template variables (they override the special tokens).

        Raises:
            ChatTemplateError: bad messages, a failing template (`raise_exception`), or a sandbox
                violation.
        """
        if not isinstance(messages, (list, tuple)):
            raise ChatTemplateError("messages must be a list of dicts")
        chat = []
        for m in messages:
            m = _plain(m)
            if not isinstance(m, dict):
                raise ChatTemplateError(f"each message must be a dict, got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}
            # as transformers: older names for a message's reasoning are copied to the ones templates read
            reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
            chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(messages=chat, tools=_plain(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except SecurityError as e:
            raise ChatTemplateError(f"the chat template tried an unsafe operation and was stopped: {e}") from e
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from e
