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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of rows of logits, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Scorer:
    """KL(P_reference || P_model), next-token NLL and top-1 agreement of one model against a reference,
    accumulated window by window: the one place every quality number is computed (this module and
    benchmarks/testbed_quality.py, which scores llama.cpp's logits with it too)."""

    def __init__(self) -> None:
        self._kld: list[np.ndarray] = []
        self._nll: list[np.ndarray] = []
        self._agree: list[np.ndarray] = []

    def add(self, log_p: np.ndarray, logits: np.ndarray, next_tokens: np.ndarray) -> None:
        """One window: the reference's log_softmax rows, the model's logits of the same positions, and
        the token each position predicts."""
        if logits.shape != log_p.shape:
            raise ValueError(f"logits of shape {list(logits.shape)} against the reference's {list(log_p.shape)} "
                             "(the vocabularies differ?)")
        log_q = log_softmax(logits)
        self._kld.append((np.exp(log_p) * (log_p - log_q)).sum(axis=-1))
        self._nll.append(nll(log_q, next_tokens))
        self._agree.append(log_q.argmax(axis=-1) == log_p.argmax(axis=-1))

    def report(self, reference_nll: np.ndarray) -> QualityReport:
        kld = np.maximum(np.concatenate(self._kld), 0.0)  # rounding can leave -1e-17 where the two agree
        return QualityReport(
            n_tokens=int(kld.size), mean_kld=float(kld.mean()), p99_kld=float(np.percentile(kld, 99)),
            perplexity=float(np.exp(np.concatenate(self._nll).mean())),
            reference_perplexity=float(np.exp(np.mean(reference_nll))),
            top1_agreement=float(np.concatenate(self._agree).mean()))


def nll(log_p: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each position's next token."""
    return -np.take_along_axis(log_p, np.asarray(next_tokens, np.int64)[:, None], axis=-1)[:, 0]


def windows_of(tokens: np.ndarray, n_ctx: int, first: int = 0) -> list[np.ndarray]:
    """The text cut into windows of n_ctx tokens; a last, shorter window is kept if it predicts at least
    one scored token (more than first + 1 tokens)."""
    tokens = np.asarray(tokens, dtype=np.int32)
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, got {n_ctx}")
    if not 0 <= first < n_ctx - 1:
        raise ValueError(f"first must be in [0, n_ctx - 1), got {first}")
    windows = [w for w in (tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)) if len(w) >= first + 2]
    if not windows:
        raise ValueError(f"the text must have at least {first + 2} tokens")
    return windows


def window_logits(model_path: str | os.PathLike, windows: list[np.ndarray],
                   n_threads: int | None, backend: str = "auto", first: int = 0) -> Iterator[np.ndarray]:
    """Logits of positions first.. of every window, one window at a time."""
    from .llama import Llama

    llm = Llama(model_path, n_ctx=max(len(w) for w in windows), n_threads=n_threads, kv_type="f32", logits_all=True,
                backend=backend)
    for w in windows:
        llm.reset()
        llm.eval(w)
        yield llm.scores[first:len(w)]


def compare_many(models: Sequence[str | os.PathLike], reference: str | os.PathLike, tokens: np.ndarray,
                 n_ctx: int = 512, n_threads: int | None = None, backend: str = "auto",
                 first: int = 0) -> list[QualityReport]:
    """Measures each of `models` against `reference` (.upg files with the same vocabulary) on tokens;
    the reference runs once for all of them.

    Args:
        models: the quantized .upg files.
        reference: the unquantized .upg file.
        tokens: the token ids of the text.
        n_ctx: window length; the text is cut into windows of n_ctx tokens (a last, shorter window
            is kept if it has a position to score).
        n_threads: engine threads (None: all cores).
        backend: what runs both models (backends.NAMES).
        first: positions before it in each window are context only (llama-perplexity scores from
            n_ctx / 2 on); the rest predict the next token and are scored.

    Raises:
        ValueError: too few tokens, n_ctx < 2, first out of range, or the vocabularies differ.
    """
    windows = windows_of(tokens, n_ctx, first)
    runs = [window_logits(m, windows, n_threads, backend, first) for m in models]
    scorers = [Scorer() for _ in models]
    nll_ref = []
    for w, p in zip(windows, window_logits(reference, windows, n_threads, backend, first)):
        log_p = log_softmax(p[:-1])  # the last position predicts nothing here
        nxt = w[first + 1:]
        nll_ref.append(nll(log_p, nxt))
        for i, (run, scorer) in enumerate(zip(runs, scorers)):
            try:
                scorer.add(log_p, next(run)[:-1], nxt)
            except ValueError as e:
                raise ValueError(f"{models[i]}: {e}") from None
    return [s.report(np.concatenate(nll_ref)) for s in scorers]


def compare(model: str | os.PathLike, reference: str | os.PathLike, tokens: np.ndarray, n_ctx: int = 512,
            n_threads: int | None = None, backend: str = "auto", first: int = 0) -> QualityReport:
    """`compare_many` for one model."""
    return compare_many([model], reference, tokens, n_ctx, n_threads, backend, first)[0]


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

