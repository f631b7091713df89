"""Embeddings: the engine's last hidden state after the final norm against transformers'
`last_hidden_state` (the built-in model's checkpoint), pooled as llama-cpp-python pools them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Phi3ForCausalLM

from upg_backend.convert import convert_hf
from upg_backend.llama import Llama

CHECKPOINT = Path(__file__).parent / "data" / "builtin-hf"
TEXTS = ["Hello world", "What is 123 + 989?", "Große Straße 🎉"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed") / "builtin-f32.upg"
    convert_hf(CHECKPOINT, out, type="f32", progress=False)
    return out


@pytest.fixture(scope="module")
def hf():
    return Phi3ForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32, attn_implementation="eager").eval()


def hidden(hf, tokens):
    with torch.no_grad():
        return hf.model(torch.tensor([tokens])).last_hidden_state[0].numpy()


def test_token_embeddings_match_transformers(path, hf):
    with Llama(str(path), n_ctx=64, n_threads=1, kv_type="f32", pooling_type=0, n_batch=4) as llm:
        for text in TEXTS:
            tokens = llm.tokenize(text.encode())
            got = np.asarray(llm.embed(text))
            want = hidden(hf, tokens)
            assert got.shape == (len(tokens), llm.n_embd())
            assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_pooling_and_shapes(path, hf):
    with Llama(str(path), n_ctx=64, n_threads=1, kv_type="f32", embedding=True) as llm:
        tokens = llm.tokenize(TEXTS[1].encode())
        want = hidden(hf, tokens)
        mean = np.asarray(llm.embed(TEXTS[1]))
        np.testing.assert_allclose(mean, want.mean(axis=0), rtol=1e-4, atol=1e-4 * np.abs(want).max())
        unit = np.asarray(llm.embed(TEXTS[1], normalize=True))
        np.testing.assert_allclose(unit, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
        batch, count = llm.embed(TEXTS, return_count=True)
        assert len(batch) == 3 and count == sum(len(llm.tokenize(t.encode())) for t in TEXTS)
        np.testing.assert_allclose(batch[1], mean, rtol=1e-6)
        response = llm.create_embedding(TEXTS[:2], model="m")
        assert response["object"] == "list" and response["model"] == "m"
        assert [d["index"] for d in response["data"]] == [0, 1] and response["data"][0]["object"] == "embedding"
        np.testing.assert_allclose(response["data"][1]["embedding"], mean, rtol=1e-6)
        assert response["usage"]["prompt_tokens"] == response["usage"]["total_tokens"] > 0
    with Llama(str(path), n_ctx=64, n_threads=1, kv_type="f32", pooling_type=3) as last:
        np.testing.assert_allclose(last.embed(TEXTS[1]), want[-1], rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_embedding_leaves_generation_intact(path):
    with Llama(str(path), n_ctx=64, n_threads=1) as llm:
        a = llm("Hello", max_tokens=6, temperature=0)["choices"][0]["text"]
        llm.embed("something else entirely")
        assert llm.n_tokens == 0
        assert llm("Hello", max_tokens=6, temperature=0)["choices"][0]["text"] == a


def test_bad_embedding_input(path):
    with Llama(str(path), n_ctx=8, n_threads=1) as llm:
        with pytest.raises(ValueError, match="context window"):
            llm.embed("word " * 20, truncate=False)
        assert len(llm.embed("word " * 20)) == llm.n_embd()  # truncated to n_ctx
        with pytest.raises(ValueError, match="embedding input"):
            llm.embed([1.5])
        with pytest.raises(ValueError, match="nothing"):
            llm.embed([])
    with pytest.raises(ValueError, match="pooling_type"):
        Llama(str(path), pooling_type=4)
