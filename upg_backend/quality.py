"""Quantization quality: how far a quantized model's next-token distributions are from its source's.

Both models run through the same engine on the same tokens, in windows of n_ctx tokens (each window
starts from an empty context). For every predicted position we take KL(P_reference || P_quantized)
of the softmaxed logits, and the negative log-likelihood of the actual next token under each model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """Quality of a quantized model against its reference on one text.

    Attributes:
        n_tokens: predicted positions measured.
        mean_kld: mean KL(reference || quantized) in nats per token.
        p99_kld: its 99th percentile.
        perplexity: the quantized model's perplexity on the text.
        reference_perplexity: the reference's perplexity on the same tokens.
        top1_agreement: fraction of positions where both models' most likely token is the same.
    """

    n_tokens: int
    mean_kld: float
    p99_kld: float
    perplexity: float
    reference_perplexity: float
    top1_agreement: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _window_logits(model_path: str | os.PathLike, windows: list[np.ndarray],
                   n_threads: int | None, backend: str = "auto") -> Iterator[np.ndarray]:
    """Logits of every position of every window, one window at a time."""
    from .llama import Llama

    llm = Llama(model_path, n_ctx=max(len(w) for w in windows), n_threads=n_threads, kv_type="f32", logits_all=True,
                backend=backend)
    for w in windows:
        llm.reset()
        llm.eval(w)
        yield llm.scores


def compare_many(models: Sequence[str | os.PathLike], reference: str | os.PathLike, tokens: np.ndarray,
                 n_ctx: int = 512, n_threads: int | None = None, backend: str = "auto") -> list[QualityReport]:
    """Measures each of `models` against `reference` (.upg files with the same vocabulary) on tokens;
    the reference runs once for all of them.

    Args:
        models: the quantized .upg files.
        reference: the unquantized .upg file.
        tokens: the token ids of the text.
        n_ctx: window length; the text is cut into windows of n_ctx tokens (a last, shorter window
            of at least 2 tokens is kept).
        n_threads: engine threads (None: all cores).
        backend: what runs both models (backends.NAMES).

    Raises:
        ValueError: fewer than 2 tokens, n_ctx < 2, or the vocabularies differ.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, got {n_ctx}")
    windows = [w for w in (tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)) if len(w) >= 2]
    if not windows:
        raise ValueError("the text must have at least 2 tokens")
    runs = [_window_logits(m, windows, n_threads, backend) for m in models]
    klds, nll, agree = ([[] for _ in models] for _ in range(3))
    nll_ref = []
    for w, p in zip(windows, _window_logits(reference, windows, n_threads, backend)):
        log_p = _log_softmax(p[:-1])  # the last position predicts nothing here
        nxt = w[1:, None].astype(np.int64)
        nll_ref.append(-np.take_along_axis(log_p, nxt, axis=-1)[:, 0])
        for i, run in enumerate(runs):
            q = next(run)
            if q.shape != p.shape:
                raise ValueError(f"{models[i]}: the vocabulary differs from the reference's "
                                 f"({q.shape[1]} and {p.shape[1]} tokens)")
            log_q = _log_softmax(q[:-1])
            klds[i].append((np.exp(log_p) * (log_p - log_q)).sum(axis=-1))
            nll[i].append(-np.take_along_axis(log_q, nxt, axis=-1)[:, 0])
            agree[i].append(log_q.argmax(axis=-1) == log_p.argmax(axis=-1))
    ref_ppl = float(np.exp(np.concatenate(nll_ref).mean()))
    reports = []
    for i in range(len(models)):
        kld = np.maximum(np.concatenate(klds[i]), 0.0)  # rounding can leave -1e-17 where the two agree
        reports.append(QualityReport(
            n_tokens=int(kld.size), mean_kld=float(kld.mean()), p99_kld=float(np.percentile(kld, 99)),
            perplexity=float(np.exp(np.concatenate(nll[i]).mean())), reference_perplexity=ref_ppl,
            top1_agreement=float(np.concatenate(agree[i]).mean())))
    return reports


def compare(model: str | os.PathLike, reference: str | os.PathLike, tokens: np.ndarray, n_ctx: int = 512,
            n_threads: int | None = None, backend: str = "auto") -> QualityReport:
    """`compare_many` for one model."""
    return compare_many([model], reference, tokens, n_ctx, n_threads, backend)[0]


@contextlib.contextmanager
def reference_upg(src: str | os.PathLike) -> Iterator[Path]:
    """The unquantized reference as a .upg file: a .upg is used as is; a Hugging Face directory or a
    .gguf file is converted to f32 in a temporary directory, removed afterwards."""
    src = Path(src)
    if src.is_file() and src.suffix == ".upg":
        yield src
        return
    with tempfile.TemporaryDirectory(prefix="upg-quality-") as tmp:
        out = Path(tmp) / "reference-f32.upg"
        if src.is_dir():
            from .convert import convert_hf

            convert_hf(src, out, type="f32", progress=False)
        elif src.is_file() and src.suffix == ".gguf":
            from .gguf_source import convert_gguf

            convert_gguf(src, out, type="f32", progress=False)
        elif not src.exists():
            raise FileNotFoundError(f"no such file or directory: {src}")
        else:
            raise ValueError(f"{src}: the reference must be a Hugging Face directory, a .gguf or a .upg file")
        yield out


def measure(model: str | os.PathLike, reference: str | os.PathLike, text: str, n_ctx: int = 512,
            n_threads: int | None = None, backend: str = "auto") -> QualityReport:
    """`compare` on a text, tokenized with the model's tokenizer (BOS as the model's config says).

    Args:
        model: the quantized .upg file.
        reference: the unquantized source: a Hugging Face directory, a .gguf or a .upg file.
        text: the evaluation text.
        n_ctx: window length in tokens.
        n_threads: engine threads (None: all cores).
        backend: what runs both models (backends.NAMES).
    """
    from .format import UPGFile
    from .tokenizer import Tokenizer

    header = UPGFile(model).header
    tokens = Tokenizer(header.get("tokenizer"), header.get("tokenizer_config")).encode(text)
    with reference_upg(reference) as ref:
        return compare(model, ref, np.asarray(tokens), n_ctx, n_threads, backend)

