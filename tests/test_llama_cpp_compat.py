"""upg_backend.llama_cpp stands in for llama-cpp-python: its arguments (positionally too), and the
real host libraries that import `llama_cpp` themselves (LangChain's LlamaCpp, ChatLlamaCpp,
LlamaCppEmbeddings; LlamaIndex's LlamaCPP) running unchanged on the built-in model. Each library's
answer is checked against the same request made to `Llama` directly."""
from __future__ import annotations

import json
import sys
import types
from typing import Literal

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

import upg_backend.llama_cpp
from conftest import llama_index_llama_cpp_dir
from upg_backend.builtin import builtin_model_path

upg_backend.llama_cpp.install()  # before LangChain or LlamaIndex look for llama_cpp
from langchain_community.chat_models import ChatLlamaCpp  # noqa: E402
from langchain_community.embeddings import LlamaCppEmbeddings  # noqa: E402
from langchain_community.llms import LlamaCpp  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402

MODEL = str(builtin_model_path())
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
# LangChain's own sampling defaults, sent with every call
LC_SAMPLING = dict(top_p=0.95, top_k=40, repeat_penalty=1.1)


@pytest.fixture(scope="module")
def ref():
    with upg_backend.llama_cpp.Llama(MODEL, n_ctx=1024, n_threads=1) as llm:
        yield llm


def test_the_names_libraries_import():
    import llama_cpp
    from llama_cpp import (Llama, LlamaCache, LlamaGrammar, LlamaRAMCache, LogitsProcessorList,  # noqa: F401
                           StoppingCriteriaList, llama_chat_format, llama_types)
    assert llama_cpp is upg_backend.llama_cpp and Llama is upg_backend.Llama
    assert sys.modules["llama_cpp.llama_types"] is llama_types
    upg_backend.llama_cpp.install()  # again: harmless


def test_install_refuses_when_llama_cpp_python_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    with pytest.raises(RuntimeError, match="already imported"):
        upg_backend.llama_cpp.install()


def test_constructor_takes_llama_cpp_python_arguments():
    # what LangChain's LlamaCpp passes, defaults included
    with upg_backend.llama_cpp.Llama(MODEL, rope_freq_scale=1.0, rope_freq_base=10000.0, lora_path=None, lora_base=None,
                                     n_ctx=256, n_parts=-1, seed=-1, f16_kv=True, logits_all=False, vocab_only=False,
                                     use_mlock=False, n_threads=1, n_batch=8, use_mmap=True, last_n_tokens_size=64,
                                     verbose=False, n_gpu_layers=0, type_k=1, type_v=1, flash_attn=True) as llm:
        assert llm.backend == "cpu" and llm.context_params.n_ctx == 256 == llm.n_ctx()
        assert llm("Hi", max_tokens=2)["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(TypeError, match="n_ctxx"):
        upg_backend.llama_cpp.Llama(MODEL, n_ctxx=8)
    with pytest.raises(ValueError, match="lora_path"):
        upg_backend.llama_cpp.Llama(MODEL, lora_path="adapter.bin")
    with pytest.raises(ValueError, match="main_gpu"):
        upg_backend.llama_cpp.Llama(MODEL, main_gpu=3)
    with pytest.raises(ValueError, match="type_k"):
        upg_backend.llama_cpp.Llama(MODEL, type_k=8, type_v=8)


def test_positional_arguments_in_llama_cpp_python_order(ref):
    ban = {t: -np.inf for t in ref._eos_ids}
    by_position = ref("Hi", None, 2, 0.0, logit_bias=ban)  # prompt, suffix, max_tokens, temperature
    by_name = ref.create_completion(prompt="Hi", max_tokens=2, temperature=0.0, logit_bias=ban)
    assert by_position["usage"]["completion_tokens"] == 2
    assert by_position["choices"][0]["text"] == by_name["choices"][0]["text"]
    chat = ref.create_chat_completion(QUESTION, None, None, None, None, 0.0)  # ..., temperature
    assert chat["choices"][0]["message"] == ref.create_chat_completion(QUESTION, temperature=0.0)["choices"][0]["message"]


def test_more_llama_cpp_python_methods(ref):
    tokens = ref.tokenize(b"Hello world")
    assert ref.detokenize(tokens, tokens[:1]) == b"Hello world" == ref.detokenize(tokens, None, False)
    assert ref.detokenize(ref.tokenize(b"\n", add_bos=False)) == b"\n" and ref.token_nl() >= 0
    assert ref.detokenize([ref.token_nl()]) == b"\n"
    it = ref.generate(tokens, temp=0.0)
    first = [next(it) for _ in range(3)]
    assert first == [next(iter(ref.generate(tokens + first[:i], temperature=0.0))) for i in range(3)]
    with pytest.raises(ValueError, match="upg convert"):
        upg_backend.llama_cpp.Llama.from_pretrained("org/model", "*q4.gguf")


def test_suffix_seed_logits_processor_stopping_criteria(ref):
    plain = ref("Hello", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert ref("Hello", suffix=" THE END", max_tokens=6, temperature=0)["choices"][0]["text"] == plain + " THE END"
    kw = dict(max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert ref("Hello", seed=3, **kw)["choices"][0]["text"] == ref("Hello", seed=3, **kw)["choices"][0]["text"]
    only = ref.tokenize(b" yes", add_bos=False)[0]

    def just_yes(input_ids, scores):
        scores[np.arange(len(scores)) != only] = -np.inf
        return scores
    out = ref("Hello", max_tokens=4, logits_processor=upg_backend.llama_cpp.LogitsProcessorList([just_yes]))
    assert out["choices"][0]["text"] == ref.tokenizer.token_bytes(only).decode() * 4
    stop = upg_backend.llama_cpp.StoppingCriteriaList([lambda ids, logits: len(ids) >= 3])
    assert ref("Hello", max_tokens=9, stopping_criteria=stop)["choices"][0]["finish_reason"] == "stop"
    assert ref("Hello", max_tokens=2, tfs_z=1.0, mirostat_mode=0, model="x")["model"] == "x"
    with pytest.raises(ValueError, match="mirostat"):
        ref("Hello", mirostat_mode=2)


def test_suffix_fills_the_middle_where_the_vocabulary_can(monkeypatch):
    with upg_backend.llama_cpp.Llama(MODEL, n_ctx=256, n_threads=1) as llm:
        # the built-in vocabulary has no FIM tokens: stand three of its special tokens in for them
        pre, suf, mid = (llm.tokenizer.token_id(t) for t in ("<|im_start|>", "<|im_sep|>", "<|dummy_85|>"))
        monkeypatch.setattr(llm, "_fim_ids", lambda: (pre, suf, mid))
        out = llm("def f(", suffix=") return 1", max_tokens=1, temperature=0)
        want = [pre, *llm.tokenize(b"def f("), suf, *llm.tokenize(b") return 1", add_bos=False), mid]
        assert llm.input_ids.tolist() == want  # llama-cpp-python's order; the one token made is not evaluated
        assert not out["choices"][0]["text"].endswith(") return 1")


def test_chat_format_chatml_renders_as_llama_cpp_python():
    with upg_backend.llama_cpp.Llama(MODEL, chat_format="chatml", n_ctx=256, n_threads=1) as llm:
        llm.create_chat_completion([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], max_tokens=1)
        # llama-cpp-python's format_chatml: role + "\n" + content + "<|im_end|>\n", then "<|im_start|>assistant\n"
        want = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        assert llm.detokenize(llm.input_ids, special=True).decode() == want
    with pytest.raises(ValueError, match="no chat template 'vicuna'"):
        upg_backend.llama_cpp.Llama(MODEL, chat_format="vicuna")


def test_langchain_llamacpp(ref):
    llm = LlamaCpp(model_path=MODEL, n_ctx=512, n_threads=1, temperature=0, max_tokens=8, verbose=False)
    want = ref("Hello there", max_tokens=8, temperature=0, **LC_SAMPLING)["choices"][0]["text"]
    assert llm.invoke("Hello there") == want
    assert "".join(llm.stream("Hello there")) == want
    assert llm.get_num_tokens("Hello world") == len(ref.tokenize(b"Hello world"))
    yes_no = LlamaCpp(model_path=MODEL, n_ctx=512, n_threads=1, max_tokens=8, verbose=False,
                      grammar='root ::= "yes" | "no"')
    assert yes_no.invoke("Is the sky blue?") in ("yes", "no")


def test_langchain_chat_llamacpp(ref):
    chat = ChatLlamaCpp(model_path=MODEL, n_ctx=1024, n_threads=1, temperature=0, max_tokens=16, verbose=False)
    want = ref.create_chat_completion(QUESTION, temperature=0, max_tokens=16, **LC_SAMPLING)["choices"][0]["message"]
    assert chat.invoke([HumanMessage("What is 2 + 3?")]).content == want["content"]
    assert "".join(c.content for c in chat.stream("What is 2 + 3?")) == want["content"]


class add(BaseModel):
    """Adds two numbers."""

    a: int = Field(ge=0, le=999)
    b: int = Field(ge=0, le=999)


class City(BaseModel):
    """A city and whether it is a capital."""

    name: Literal["Paris", "Rome", "Oslo"]
    capital: bool


def test_langchain_bind_tools_and_structured_output():
    chat = ChatLlamaCpp(model_path=MODEL, n_ctx=1024, n_threads=1, temperature=0.8, max_tokens=128, verbose=False,
                        seed=1)
    message = chat.bind_tools([add], tool_choice="add").invoke("What is 2 + 3?")
    assert [c["name"] for c in message.tool_calls] == ["add"]
    jsonschema.validate(message.tool_calls[0]["args"], add.model_json_schema())
    assert message.additional_kwargs["tool_calls"][0]["id"] == message.tool_calls[0]["id"]
    city = chat.with_structured_output(City).invoke("Name a capital city.")
    assert isinstance(city, City)


def test_langchain_embeddings(ref):
    emb = LlamaCppEmbeddings(model_path=MODEL, n_ctx=512, n_threads=1, verbose=False)
    np.testing.assert_allclose(emb.embed_query("Hello world"), ref.embed("Hello world"), rtol=1e-6)
    docs = emb.embed_documents(["a cat", "a dog"])
    assert len(docs) == 2 and len(docs[0]) == ref.n_embd()
    np.testing.assert_allclose(docs[1], ref.embed("a dog"), rtol=1e-6)


def test_llama_index_llamacpp(ref):
    sys.path.insert(0, str(llama_index_llama_cpp_dir()))
    try:
        from llama_index.core.llms import ChatMessage
        from llama_index.llms.llama_cpp import LlamaCPP
    finally:
        sys.path.remove(str(llama_index_llama_cpp_dir()))
    llm = LlamaCPP(model_path=MODEL, temperature=0, max_new_tokens=8, context_window=512,
                   model_kwargs={"n_threads": 1}, verbose=False)
    assert llm.metadata.context_window == 512
    want = ref("Hello there", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert llm.complete("Hello there").text == want
    assert "".join(r.delta for r in llm.stream_complete("Hello there")) == want
    reply = llm.chat([ChatMessage(role="user", content="What is 2 + 3?")])
    assert isinstance(reply.message.content, str)


def test_json_schema_grammar_from_llama_cpp(ref):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = upg_backend.llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema))
    out = ref("Answer:", max_tokens=20, grammar=grammar, seed=0)["choices"][0]
    assert json.loads(out["text"]) in ({"ok": True}, {"ok": False})
