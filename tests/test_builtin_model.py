"""The built-in model: the shipped file answers held-out questions, at every weight type, and its
weights compute what transformers computes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Phi3ForCausalLM

from upg_backend import Llama
from upg_backend.builtin import BUILTIN_MODEL
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "tests" / "data" / "builtin-hf"
N_QUESTIONS = 400


def _training_data():
    spec = importlib.util.spec_from_file_location("builtin_training_data", REPO / "training" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy(llm: Llama) -> float:
    """Share of held-out questions (never trained on) whose greedy reply is exactly the answer."""
    items = list(_training_data().heldout(N_QUESTIONS, seed=1))
    right = 0
    for messages, expected in items:
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=64)
        right += reply["choices"][0]["message"]["content"].strip() == expected
    return right / len(items)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    paths = {}
    for t in ("f32", "f16", "q8_0", "q4", "q3"):
        paths[t] = out / f"builtin-{t}.upg"
        convert_hf(CHECKPOINT, paths[t], type=t, progress=False)
    return paths


@pytest.fixture(scope="module")
def accuracies(converted):
    return {t: accuracy(Llama(str(p), n_ctx=256)) for t, p in converted.items() if t != "f32"}


def test_held_out_questions_are_never_trained_on():
    data = _training_data()
    user_turns = [(m[0]["content"] if m[0]["role"] == "system" else None, turn["content"])
                  for m in data.conversations(20000, seed=0) for turn in m if turn["role"] == "user"]
    trained_pairs, trained_questions = set(user_turns), {q for _, q in user_turns}
    for task in data.TASKS:
        for messages, _ in data.heldout(250, seed=1, task=task):
            system = messages[0]["content"] if messages[0]["role"] == "system" else None
            question = messages[-1]["content"]
            # greetings are held out by phrasing and system message together, the rest by operands
            assert (system, question) not in trained_pairs
            assert task == "greeting" or question not in trained_questions, question


def test_shipped_model_loads_by_default_and_answers_held_out_questions():
    llm = Llama()
    assert Path(llm.model_path).resolve() == BUILTIN_MODEL.resolve()
    assert accuracy(llm) >= 0.95


def test_shipped_file_is_the_checkpoint_at_q8_0(converted):
    shipped, fresh = UPGFile(BUILTIN_MODEL), UPGFile(converted["q8_0"])
    assert shipped.tensors.keys() == fresh.tensors.keys()
    for name in fresh.tensors:
        assert np.array_equal(shipped.raw(name), fresh.raw(name)), name
    assert shipped.header["tokenizer"] == fresh.header["tokenizer"]
    assert shipped.header["chat_templates"] == fresh.header["chat_templates"]
    assert BUILTIN_MODEL.stat().st_size <= 16 * 2**20


@pytest.mark.parametrize("weight_type", ["f16", "q8_0", "q4", "q3"])
def test_accuracy_at_each_type(accuracies, weight_type):
    assert accuracies[weight_type] >= 0.95, accuracies


@pytest.mark.parametrize("weight_type", ["q8_0", "q4"])
def test_quantized_within_two_points_of_f16(accuracies, weight_type):
    assert accuracies[weight_type] >= accuracies["f16"] - 0.02, accuracies


def test_trained_weights_match_transformers(converted):
    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    model = Phi3ForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32, attn_implementation="eager").eval()
    messages = [{"role": "user", "content": "What is 123 + 989?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    llm = Llama(str(converted["f32"]), n_ctx=256, logits_all=True, kv_type="f32")
    assert llm.tokenize(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).encode(),
                        add_bos=False, special=True) == list(ids)
    llm.eval(ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(llm.scores)[: len(ids)]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
