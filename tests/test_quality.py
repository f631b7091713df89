"""`upg_backend.quality` and `upg quality`: KL divergence and perplexity against transformers running
the same weights (the quantized ones decoded by the numpy reference decoder)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import quant as ref
from test_gguf import tiny_checkpoint
from upg_backend import cli, quality
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile
from upg_backend.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world, how are you today? " * 6
        + "Große Straße, café, naïve, 東京, 🎉 emoji. user assistant system: answer the question.")
N_CTX = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama checkpoint and its f32 and q4 (block 32) conversions."""
    tmp = tmp_path_factory.mktemp("quality")
    from conftest import make_hf_checkpoint

    src = tiny_checkpoint(lambda **kw: make_hf_checkpoint(tmp / "hf", **kw), "llama",
                          initializer_range=0.3)
    out = {"src": src}
    for t in ("f32", "q4"):
        out[t] = tmp / f"{t}.upg"
        convert_hf(src, out[t], type=t, progress=False)
    return out


FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}  # transformers' Llama layer -> the file's fused tensor


def hf_model(upg: UPGFile):
    """transformers' LlamaForCausalLM with the file's weights, quantized ones decoded by the reference,
    and the inputs of q8_0 / q4 layers quantized to 8 bits as the engine's kernels quantize them."""
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in upg.header["config"].items()
                                         if k not in ("architectures", "transformers_version", "dtype")})
    cfg = upg.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    state = {}
    for name, info in upg.tensors.items():
        if info.dtype in ref.QUANTIZED:
            w = ref.dequantize(info.dtype, info.block, upg.tensor(name), *info.dims)
        else:
            w = np.array(upg.tensor(name), dtype=np.float32)
        if name.endswith("qkv_proj.weight"):
            base = name[:-len("qkv_proj.weight")]
            state.update({base + "q_proj.weight": w[:q], base + "k_proj.weight": w[q:q + kv],
                          base + "v_proj.weight": w[q + kv:]})
        elif name.endswith("gate_up_proj.weight"):
            base = name[:-len("gate_up_proj.weight")]
            half = w.shape[0] // 2
            state.update({base + "gate_proj.weight": w[:half], base + "up_proj.weight": w[half:]})
        else:
            state[name] = w
    model = transformers.LlamaForCausalLM(config).eval()
    hooked = 0
    for module_name, module in model.named_modules():
        head, _, leaf = module_name.rpartition(".")
        fused = f"{head}.{FUSED.get(leaf, leaf)}" if head else leaf
        if module_name == "lm_head" and "lm_head.weight" not in upg.tensors:
            fused = "model.embed_tokens"
        info = upg.tensors.get(fused + ".weight")
        if isinstance(module, torch.nn.Linear) and info is not None and info.dtype in ref.ACT_Q8_TYPES:
            def quantize_input(_, args, info=info):
                x = args[0].detach().numpy()
                return (torch.from_numpy(ref.activations_as_used(info.dtype, info.block, x).astype(np.float32)),)
            module.register_forward_pre_hook(quantize_input)
            hooked += 1
    assert hooked in (0, 7 * cfg.num_hidden_layers + 1), hooked  # every projection and the head, or none
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return model


def expected(models, tokens: list[int], first: int = 0) -> dict[str, float]:
    """KLD, perplexities and top-1 agreement computed with torch from transformers' logits, over the
    positions from `first` on of each window."""
    p_model, q_model = hf_model(UPGFile(models["f32"])), hf_model(UPGFile(models["q4"]))
    klds, nll_q, nll_p, agree = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(tokens), N_CTX):
            w = torch.tensor([tokens[i:i + N_CTX]])
            if w.shape[1] < first + 2:
                continue
            log_p = torch.log_softmax(p_model(w).logits[0, first:-1].double(), -1)
            log_q = torch.log_softmax(q_model(w).logits[0, first:-1].double(), -1)
            klds.append(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
            nll_q.append(torch.nn.functional.nll_loss(log_q, w[0, first + 1:], reduction="none"))
            nll_p.append(torch.nn.functional.nll_loss(log_p, w[0, first + 1:], reduction="none"))
            agree.append(log_q.argmax(-1) == log_p.argmax(-1))
    kld = torch.cat(klds).numpy()
    return {"n_tokens": kld.size, "mean_kld": kld.mean(), "p99_kld": np.percentile(kld, 99),
            "perplexity": float(torch.cat(nll_q).mean().exp()), "reference_perplexity": float(torch.cat(nll_p).mean().exp()),
            "top1_agreement": float(torch.cat(agree).double().mean())}


def test_q4_against_f32_matches_transformers(models):
    header = UPGFile(models["q4"]).header
    tokens = Tokenizer(header["tokenizer"], header["tokenizer_config"]).encode(TEXT)
    assert len(tokens) > 3 * N_CTX and len(tokens) % N_CTX >= 2  # several windows and a short last one
    got = quality.compare(models["q4"], models["f32"], np.array(tokens), n_ctx=N_CTX, n_threads=1)
    want = expected(models, tokens)
    print(got)
    assert got.n_tokens == want["n_tokens"] == len(tokens) - -(-len(tokens) // N_CTX)
    assert got.mean_kld > 1e-4  # q4 on these weights is measurably off
    for key in ("mean_kld", "p99_kld", "perplexity", "reference_perplexity"):
        assert getattr(got, key) == pytest.approx(want[key], rel=2e-3), key
    assert got.top1_agreement == pytest.approx(want["top1_agreement"], abs=2 / got.n_tokens)


def test_second_half_scoring_matches_transformers(models):
    """first = n_ctx / 2, as llama-perplexity scores (benchmarks/testbed_quality.py)."""
    header = UPGFile(models["q4"]).header
    tokens = Tokenizer(header["tokenizer"], header["tokenizer_config"]).encode(TEXT)
    first = N_CTX // 2
    got = quality.compare(models["q4"], models["f32"], np.array(tokens), n_ctx=N_CTX, n_threads=1, first=first)
    want = expected(models, tokens, first)
    assert got.n_tokens == want["n_tokens"] == sum(max(0, min(N_CTX, len(tokens) - i) - first - 1)
                                                   for i in range(0, len(tokens), N_CTX))
    for key in ("mean_kld", "p99_kld", "perplexity", "reference_perplexity"):
        assert getattr(got, key) == pytest.approx(want[key], rel=2e-3), key
    with pytest.raises(ValueError, match="first"):
        quality.compare(models["q4"], models["f32"], np.array(tokens), n_ctx=N_CTX, first=N_CTX - 1)


def test_model_against_itself_and_hf_reference(models):
    same = quality.measure(models["f32"], models["f32"], TEXT, n_ctx=N_CTX)
    assert same.mean_kld == 0 and same.p99_kld == 0 and same.top1_agreement == 1
    assert same.perplexity == same.reference_perplexity > 1
    # a Hugging Face directory as the reference is converted to f32 on the fly: same numbers
    via_dir = quality.measure(models["q4"], models["src"], TEXT, n_ctx=N_CTX)
    assert via_dir == quality.measure(models["q4"], models["f32"], TEXT, n_ctx=N_CTX)
    many = quality.compare_many([models["f32"], models["q4"]], models["f32"],
                                np.array(Tokenizer(UPGFile(models["f32"]).header["tokenizer"]).encode(TEXT)), N_CTX)
    assert many == [same, via_dir]


def test_bad_input(models, tmp_path):
    with pytest.raises(ValueError, match="n_ctx"):
        quality.compare(models["q4"], models["f32"], np.arange(10), n_ctx=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        quality.compare(models["q4"], models["f32"], np.arange(1), n_ctx=8)
    with pytest.raises(FileNotFoundError):
        quality.measure(models["q4"], tmp_path / "absent", TEXT)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="Hugging Face directory, a .gguf or a .upg"):
        quality.measure(models["q4"], tmp_path / "notes.txt", TEXT)


def test_cli_quality(models, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert cli.main(["quality", str(models["q4"]), "--reference", str(models["src"]), "--text", str(text),
                     "--n-ctx", str(N_CTX)]) == 0
    out = capsys.readouterr().out
    report = quality.measure(models["q4"], models["f32"], TEXT, n_ctx=N_CTX)
    assert f"mean KLD        {report.mean_kld:.5f}" in out and f"p99 KLD         {report.p99_kld:.5f}" in out
    assert f"perplexity      {report.perplexity:.4f} (reference {report.reference_perplexity:.4f})" in out
    assert cli.main(["quality", str(models["q4"]), "--reference", str(tmp_path / "absent"), "--text", str(text)]) == 1
    assert "upg quality: error:" in capsys.readouterr().err
