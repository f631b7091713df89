"""Tool calling in process: OpenAI-shaped tool_calls under tool_choice auto / none / required / named,
arguments checked with jsonschema; tool histories rendered; tool-aware templates rendered as
transformers renders them."""
from __future__ import annotations

import json

import jsonschema
import pytest
import transformers

from upg_backend.llama import Llama

ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                   "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
                   "required": ["city"]}}}
TOOLS = [ADD, WEATHER]
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]

# a tool-aware template in the style of Qwen's (Hermes tool calls), to check the pass-through
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system<|im_sep|>Tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant<|im_sep|>{{ m.content or '' }}
{%- for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>
{%- elif m.role == 'tool' %}<|im_start|>user<|im_sep|><tool_response>{{ m.content }}</tool_response><|im_end|>
{%- else %}<|im_start|>{{ m.role }}<|im_sep|>{{ m.content }}<|im_end|>{% endif %}
{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|im_sep|>{% endif %}"""


@pytest.fixture(scope="module")
def llm():
    with Llama(n_ctx=1024, n_threads=1) as llm:
        yield llm


def check_calls(message, names):
    assert message["role"] == "assistant" and message["tool_calls"]
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


@pytest.mark.parametrize("seed", range(3))
def test_required_and_named_choices_call_with_valid_arguments(llm, seed):
    out = llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                                     max_tokens=200)
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    check_calls(out["choices"][0]["message"], {"add", "weather"})
    named = {"type": "function", "function": {"name": "weather"}}
    out = llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice=named, temperature=1.0, seed=seed,
                                     max_tokens=200)
    message = out["choices"][0]["message"]
    check_calls(message, {"weather"})
    assert len(message["tool_calls"]) == 1 and message["content"] is None


def test_none_and_auto(llm):
    none = llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert "tool_calls" not in none["choices"][0]["message"] and none["choices"][0]["finish_reason"] != "tool_calls"
    for seed in range(3):  # auto: text, or calls that are valid
        auto = llm.create_chat_completion(QUESTION, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60)
        message = auto["choices"][0]["message"]
        if "tool_calls" in message:
            check_calls(message, {"add", "weather"})
        else:
            assert isinstance(message["content"], str)


def test_streamed_tool_calls_match_the_answer(llm):
    kw = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, max_tokens=200)
    whole = llm.create_chat_completion(QUESTION, **kw)["choices"][0]
    chunks = list(llm.create_chat_completion(QUESTION, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    calls = [c for ch in chunks for choice in ch["choices"] for c in choice["delta"].get("tool_calls", [])]
    assert [c["function"] for c in calls] == [c["function"] for c in whole["message"]["tool_calls"]]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_tool_history_renders_and_answers(llm):
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    out = llm.create_chat_completion(history, tools=TOOLS, temperature=0, max_tokens=20)
    assert out["choices"][0]["message"]["role"] == "assistant"
    prompt = llm.detokenize(llm.input_ids, special=True).decode()
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in prompt
    assert "<tool_response>\n5\n</tool_response>" in prompt and '"name": "weather"' in prompt
    # without tools in the request the history still renders
    assert llm.create_chat_completion(history, temperature=0, max_tokens=4)["choices"][0]["message"]["content"] is not None


def test_tool_aware_template_renders_as_transformers(llm, tmp_path):
    with Llama(n_ctx=1024, n_threads=1, chat_template=TOOL_TEMPLATE) as custom:
        assert custom.chat_template.knows_tools
        history = QUESTION + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
        custom.create_chat_completion(history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=1)
        custom.tokenizer._hf.save(str(tmp_path / "tokenizer.json"))
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
        want = hf.apply_chat_template(history, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
        # the context holds the prompt (the one token generated is not evaluated)
        assert custom.detokenize(custom.input_ids, special=True).decode() == want


def test_bad_tool_requests(llm):
    with pytest.raises(ValueError, match="not among the tools"):
        llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="multiply")
    with pytest.raises(ValueError, match="each tool"):
        llm.create_chat_completion(QUESTION, tools=[{"type": "function"}])
    with pytest.raises(ValueError, match="needs tools"):
        llm.create_chat_completion(QUESTION, tool_choice="required")
    with pytest.raises(ValueError, match="only one"):
        llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="text parts"):
        llm.create_chat_completion([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_content_parts_are_joined(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]}]
    a = llm.create_chat_completion(parts, temperature=0, max_tokens=12)["choices"][0]["message"]
    b = llm.create_chat_completion(QUESTION, temperature=0, max_tokens=12)["choices"][0]["message"]
    assert a == b
