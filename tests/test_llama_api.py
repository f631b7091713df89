"""The llama-cpp-python-style `Llama` API on a tiny random chat model, against outside references
(transformers for logits and tokenization, numpy for logprobs, json for constrained output)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from chat_model import make_chat_model
from conftest import PHI4_DIR
from upg_backend.builtin import BUILTIN_MODEL, builtin_model_path
from upg_backend.llama import Llama
from upg_backend.sampling import SamplingParams
from upg_backend.tokenizer import Tokenizer

TEXTS = ["Hello world", "Große Straße café 東京 🎉", "  spaces\n\nand\ttabs ", "<|im_start|>user", ""]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def llama(model_path):
    with Llama(model_path, n_ctx=128, n_threads=1, seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_model(model_path):
    return transformers.LlamaForCausalLM.from_pretrained(model_path.parent / "hf").eval()


def hf_logits(hf_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].numpy()


def scripted(llama, monkeypatch, tokens):
    """Makes the sampler return `tokens` in order (to drive the text pipeline exactly)."""
    it = iter(tokens)
    monkeypatch.setattr(llama, "sample", lambda sampling=None, logits=None: next(it))
    monkeypatch.setattr(llama, "sample_on_backend", False)  # every token through sample, none by eval_sample


def test_tokenize_matches_transformers(llama, model_path):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_path.parent / "hf" / "tokenizer.json"))
    for text in TEXTS:
        ids = llama.tokenize(text.encode(), special=True)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert llama.detokenize(ids, special=True) == text.encode()
    assert llama.tokenize(b"<|im_start|>", special=True) == [llama.tokenizer.token_id("<|im_start|>")]
    assert len(llama.tokenize(b"<|im_start|>", special=False)) > 1
    assert llama.detokenize(llama.tokenize(b"<|im_end|>x", special=True)) == b"x"
    assert llama.tokenizer.add_bos is False and llama.tokenize(b"x", add_bos=True) == llama.tokenize(b"x", add_bos=False)
    with pytest.raises(ValueError, match="bytes"):
        llama.tokenize("text")


def test_phi4_tokenizer():
    d = PHI4_DIR
    config = json.loads((d / "tokenizer_config.json").read_text())
    tok = Tokenizer(json.loads((d / "tokenizer.json").read_text()), config)
    assert tok.encode("Hello World") == [9906, 4435]
    text = "<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>"
    assert tok.encode(text, special=True) == [100264, 9906, 100266, 4435, 100265, 100349]
    assert tok.add_bos is False  # tokenizer_config add_bos_token: false
    with_bos = Tokenizer(json.loads((d / "tokenizer.json").read_text()), {**config, "add_bos_token": True})
    assert with_bos.encode("Hello World") == [100257, 9906, 4435]
    assert tok.decode(tok.encode("héllo 🎉 世界")) == "héllo 🎉 世界".encode()


def test_eval_scores_and_batches(model_path, hf_model):
    tokens = [5, 17, 42, 99, 7, 3, 250, 11, 64]
    want = hf_logits(hf_model, tokens)
    for n_batch in (512, 4, 1):
        with Llama(model_path, n_ctx=32, n_threads=1, n_batch=n_batch, logits_all=True) as llm:
            llm.eval(tokens[:5])
            llm.eval(tokens[5:])
            assert llm.n_tokens == len(tokens) and llm.input_ids.tolist() == tokens
            assert llm.scores.shape == (len(tokens), llm.n_vocab()) and llm.scores.dtype == np.float32
            np.testing.assert_allclose(llm.scores, want, atol=2e-3, rtol=1e-3)
    with Llama(model_path, n_ctx=32, n_threads=1) as llm:
        llm.eval(tokens)
        assert llm.scores.shape == (1, llm.n_vocab())
        np.testing.assert_allclose(llm.scores[0], want[-1], atol=2e-3, rtol=1e-3)
        with pytest.raises(ValueError, match="context window"):
            llm.eval(list(range(32)))
        with pytest.raises(ValueError, match="token ids"):
            llm.eval([llm.n_vocab()])
        llm.reset()
        assert llm.n_tokens == 0 and llm.input_ids.tolist() == []


def test_metadata_and_special_tokens(llama):
    assert llama.n_ctx() == 128 and llama.n_vocab() == llama.tokenizer.n_vocab
    assert llama.token_eos() == llama.tokenizer.token_id("<|im_end|>")
    assert llama.token_bos() == llama.tokenizer.token_id("<|endoftext|>")
    assert llama.metadata["architecture"] == "LlamaForCausalLM"
    assert "default" in llama.metadata["chat_templates"]


def test_greedy_completion_matches_transformers(llama, hf_model):
    prompt = llama.tokenize(b"Hello world")
    ban = {t: -np.inf for t in llama._eos_ids}
    out = llama.create_completion(prompt, max_tokens=8, temperature=0, logit_bias=ban)
    tokens = list(prompt)
    for _ in range(8):  # greedy decoding on the transformers model, end-of-turn tokens banned
        logits = hf_logits(hf_model, tokens)[-1]
        logits[list(ban)] = -np.inf
        tokens.append(int(np.argmax(logits)))
    assert out["choices"][0]["text"] == llama.detokenize(tokens[len(prompt):]).decode("utf-8", errors="ignore")
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["object"] == "text_completion"
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 8, "total_tokens": len(prompt) + 8}


def test_stream_equals_aggregate(llama):
    kw = dict(max_tokens=20, temperature=0.9, seed=7)
    full = llama("Hello world", **kw)
    chunks = list(llama("Hello world", stream=True, **kw))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    messages = [{"role": "user", "content": "Hi there"}]
    chat = llama.create_chat_completion(messages, **kw)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llama.create_chat_completion(messages, stream=True, **kw))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == chat["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == chat["choices"][0]["finish_reason"]


def test_seed_reproducible(llama):
    a = llama("Hello", max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)["choices"][0]["text"]
    b = llama("Hello", max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)["choices"][0]["text"]
    c = llama("Hello", max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=2)["choices"][0]["text"]
    assert a == b and a != c


def piece_tokens(llama, text: str) -> list[int]:
    """Tokens that spell `text` one byte at a time (each a byte-level token of the vocabulary)."""
    table = {llama.tokenizer.token_bytes(t): t for t in range(llama.n_vocab())}
    return [table[bytes([b])] for b in text.encode()]


def test_streaming_never_splits_utf8(llama, monkeypatch):
    text = "é🎉東"
    scripted(llama, monkeypatch, piece_tokens(llama, text) + [llama.token_eos()])
    chunks = [c["choices"][0]["text"] for c in llama("Hello", max_tokens=50, stream=True)]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert len([c for c in chunks if c]) == 3  # one piece per complete character


def test_stopping_criteria_end_generation(llama):
    """llama-cpp-python's stopping_criteria: asked before each token with (input_ids, logits)."""
    prompt = llama.tokenize(b"Hello")
    seen = []

    def three_tokens(ids, logits):
        seen.append((len(ids), logits.shape))
        return len(ids) >= len(prompt) + 3

    out = llama.create_completion(prompt, max_tokens=20, temperature=0, stopping_criteria=[three_tokens])
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "stop"
    assert seen == [(len(prompt) + i, (llama.n_vocab(),)) for i in range(4)]
    chat = llama.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=20,
                                        stopping_criteria=[lambda ids, logits: True])
    assert chat["choices"][0]["message"]["content"] == "" and chat["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_spanning_tokens_never_leak(llama, monkeypatch):
    words = [" Hel", "lo", " wor", "ld", " again"]
    table = {llama.tokenizer.token_bytes(t): t for t in range(llama.n_vocab())}
    tokens = [t for w in words for t in ([table[w.encode()]] if w.encode() in table else piece_tokens(llama, w))]
    scripted(llama, monkeypatch, tokens)
    chunks = [c["choices"][0] for c in llama("Hello", max_tokens=50, stop=["xyz", "lo wo"], stream=True)]
    assert "".join(c["text"] for c in chunks) == " Hel"
    assert chunks[-1]["finish_reason"] == "stop"
    assert not any("l" in c["text"][4:] or c["text"].endswith("lo") for c in chunks)
    scripted(llama, monkeypatch, tokens)
    out = llama("Hello", max_tokens=50, stop="ld again")["choices"][0]
    assert out["text"] == " Hello wor" and out["finish_reason"] == "stop"


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_every_end_of_turn_token_stops(llama, monkeypatch, eos):
    scripted(llama, monkeypatch, piece_tokens(llama, "ab") + [llama.tokenizer.token_id(eos)] + piece_tokens(llama, "cd"))
    out = llama.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=20)
    assert out["choices"][0]["message"]["content"] == "ab"
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 2


def test_prefix_reuse_keeps_the_first_turn(llama, model_path, monkeypatch):
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = llama.create_chat_completion(turn1, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    evaluated = []
    real_eval = llama._eval
    monkeypatch.setattr(llama, "_eval", lambda tokens, generated: (evaluated.append(len(tokens)),
                                                                   real_eval(tokens, generated)))
    second = llama.create_chat_completion(turn2, max_tokens=6, temperature=0)
    prompt2 = second["usage"]["prompt_tokens"]
    turn1_tokens = len(llama.tokenize(llama.chat_template.render(turn1).encode(), add_bos=False, special=True))
    # the first turn's prompt was kept; its answer, computed by the decode kernels, is evaluated
    # again as prompt tokens (docs/ARCHITECTURE.md "Batch-invariant arithmetic")
    assert evaluated[0] == prompt2 - turn1_tokens
    with Llama(model_path, n_ctx=128, n_threads=1) as fresh:  # and the answer is the same as from scratch
        assert fresh.create_chat_completion(turn2, max_tokens=6, temperature=0)["choices"][0]["message"] == \
            second["choices"][0]["message"]


def test_logprobs_match_numpy(model_path):
    with Llama(model_path, n_ctx=64, n_threads=1, logits_all=True) as llm:
        prompt = llm.tokenize(b"Hello world")
        out = llm.create_completion(prompt, max_tokens=5, temperature=0, logprobs=3)
        lp = out["choices"][0]["logprobs"]
        rows = llm.scores[len(prompt) - 1:]
        for i, row in enumerate(rows[:len(lp["tokens"])]):
            x = row.astype(np.float64)
            ref = x - x.max() - np.log(np.exp(x - x.max()).sum())
            best = np.argsort(-ref)[:3]
            assert lp["token_logprobs"][i] == pytest.approx(ref[best[0]], abs=1e-4)  # greedy picks the best
            # keyed by text: alternatives that decode alike (partial UTF-8) share a key, as in llama-cpp-python
            assert all(min(abs(v - ref[best])) < 1e-4 for v in lp["top_logprobs"][i].values())
        # tokens holding part of a character show U+FFFD; the text has only whole characters
        assert "".join(lp["tokens"]).replace("\ufffd", "") == out["choices"][0]["text"]
        assert lp["text_offset"][0] == 0
        chat = llm.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"]
        assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)


def test_json_schema_is_enforced(llama):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                               "tag": {"enum": ["a", "b"]}}, "required": ["ok", "n", "tag"]}
    for seed in range(3):
        out = llama.create_chat_completion([{"role": "user", "content": "answer"}], max_tokens=80, temperature=1.0,
                                           seed=seed, response_format={"type": "json_object", "schema": schema})
        value = json.loads(out["choices"][0]["message"]["content"])
        assert set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool)
        assert type(value["n"]) is int and value["tag"] in ("a", "b")


def test_state_save_and_load(llama):
    llama.eval(llama.tokenize(b"Hello world"))
    state = llama.save_state()
    a = llama("Hello world how", max_tokens=6, temperature=0)["choices"][0]["text"]
    llama.reset()
    llama.eval(llama.tokenize(b"something else entirely"))
    llama.load_state(state)
    assert llama.input_ids.tolist() == state.input_ids.tolist()
    np.testing.assert_array_equal(llama.scores, state.scores)
    assert llama("Hello world how", max_tokens=6, temperature=0)["choices"][0]["text"] == a


def test_state_moves_between_instances_and_refuses_a_mismatch(llama, model_path):
    llama.eval(llama.tokenize(b"Hello world"))
    state = llama.save_state()
    with Llama(model_path, n_ctx=128, n_threads=1) as other:
        other.load_state(state)  # no evaluation: the next logits come from the restored cache alone
        other.eval(other.tokenize(b" how", add_bos=False))
        llama.eval(llama.tokenize(b" how", add_bos=False))
        np.testing.assert_array_equal(other.scores, llama.scores)
    with Llama(model_path, n_ctx=128, n_threads=1, kv_type="f32") as f32, pytest.raises(ValueError, match="state size"):
        f32.load_state(state)
    too_small = len(state.input_ids) - 1
    with Llama(model_path, n_ctx=too_small, n_threads=1) as small, pytest.raises(ValueError, match="n_past out of range"):
        small.load_state(state)


def test_bad_arguments(llama, model_path):
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        llama("x", temprature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        llama("x", temperature=-1)
    with pytest.raises(ValueError, match="context window"):
        llama("Hello world " * 200)
    with pytest.raises(ValueError, match="context window"):  # before any chunk, even when streaming
        llama.create_chat_completion([{"role": "user", "content": "Hello world " * 200}], stream=True)
    with pytest.raises(ValueError, match="response_format"):
        llama("x", response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="kv_type"):
        Llama(model_path, kv_type="int3")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1})
    assert SamplingParams(logit_bias={"5": -1}).logit_bias == {5: -1.0}


def test_close(model_path):
    llm = Llama(model_path, n_ctx=32, n_threads=1)
    with llm:
        llm.eval([1, 2])
    with pytest.raises(ValueError, match="closed"):
        llm.eval([3])


def test_builtin_model_path():
    if BUILTIN_MODEL.is_file():
        assert builtin_model_path() == BUILTIN_MODEL
    else:
        with pytest.raises(FileNotFoundError, match="built-in model"):
            Llama()


def run_cli(*args: str, stdin: str = "") -> str:
    result = subprocess.run([sys.executable, "-m", "upg_backend.cli", *args], input=stdin, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_chat_and_complete(llama, model_path):
    opts = ["-m", str(model_path), "--n-ctx", "128", "--threads", "1", "--temperature", "0", "--max-tokens", "6"]
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    a1 = llama.create_chat_completion(first, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "More"}]
    a2 = llama.create_chat_completion(second, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    # history carries into the second turn; /reset starts over with the system prompt kept
    out = run_cli("chat", *opts, "-s", "Be brief.", stdin="Hello\nMore\n/reset\nHello\n")
    assert out == f"{a1}\n{a2}\n(conversation cleared)\n{a1}\n"
    want = llama("Hello world", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert run_cli("complete", *opts, "Hello world") == want + "\n"
    bad = subprocess.run([sys.executable, "-m", "upg_backend.cli", "complete", "-m", str(model_path), "x",
                          "--temperature", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "temperature" in bad.stderr and "Traceback" not in bad.stderr
