"""A tiny random chat model with a matching tokenizer, for the runtime, server and plugin tests.

The tokenizer is a byte-level BPE trained here on a few sentences (every byte is a token, so any
text round-trips), with ChatML special tokens and the SmolLM2-style ChatML template.
"""
from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import openai
import pytest

from conftest import make_hf_checkpoint
from upg_backend.llama import Llama

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Hello world, how are you today?", "The quick brown fox jumps over the lazy dog.",
          "Große Straße, café, naïve, 東京, 🎉 emoji", "user assistant system: answer the question."] * 20


def make_tokenizer_files(out_dir: Path, vocab_size: int = 384) -> int:
    """Writes tokenizer.json, tokenizer_config.json (with the chat template) and
    generation_config.json into out_dir; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": CHATML}))
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    return tok.get_vocab_size()


def make_chat_model(out_dir: Path, seed: int = 0) -> Path:
    """Converts a tiny random Llama-architecture chat model to out_dir/model.upg and returns its path."""
    from upg_backend.convert import convert_hf

    out_dir = Path(out_dir)
    hf = out_dir / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer_files(hf)
    make_hf_checkpoint(hf, architecture="LlamaForCausalLM", seed=seed, vocab_size=vocab, max_position_embeddings=512,
                       bos_token_id=0, eos_token_id=2, pad_token_id=0)
    make_tokenizer_files(hf)  # make_hf_checkpoint copied Phi-4's tokenizer files over ours
    path = out_dir / "model.upg"
    convert_hf(hf, path, type="f32", progress=False)
    return path


# The server tests' model and context (tests/test_server.py, tests/test_server_batch.py import
# these fixtures): one model file per test module, and a second, in-process Llama on it that
# answers what the server must answer.
SERVER_N_CTX = 256


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def reference(model_path):
    return Llama(model_path, n_ctx=SERVER_N_CTX, n_threads=1)


def messages(i: int) -> list[dict[str, str]]:
    """Request i's chat: a system prompt every request shares, and its own question."""
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}: how are you?"}]


def join_and_leave(url: str, batch, reference: Llama) -> None:
    """Ten chat requests (greedy and seeded sampling, 6 to 21 tokens) arriving one after another at
    the server at url, into its running Batch: each answer must be reference's alone, bit for bit,
    the requests evaluated together (fewer steps than their tokens one by one) and the shared
    system prompt computed once and copied."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    jobs = [(i, 6 + 5 * (i % 4), 0.0 if i % 2 else 0.9) for i in range(10)]
    want = {i: reference.create_chat_completion(messages(i), max_tokens=n, temperature=t, seed=i)
            ["choices"][0]["message"]["content"] for i, n, t in jobs}

    def run(job):
        i, n, t = job
        time.sleep(0.03 * i)  # arrive one after another, into a batch already running
        r = c.chat.completions.create(model="tiny", messages=messages(i), max_tokens=n, temperature=t, seed=i)
        return i, r.choices[0].message.content
    steps0 = batch.steps
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        got = dict(pool.map(run, jobs))
    assert got == want
    assert batch.steps - steps0 < sum(n + 1 for _, n, _ in jobs)
    assert batch.prefix_copies > 0
