"""`Llama`: the llama-cpp-python-style API over one model and one inference session.

Every public generation entry point is a thin wrapper over one internal generator (`_stream`):
`stream=True` returns the iterator of chunks, otherwise the chunks are aggregated into one dict.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import _core
from .backends import open_backend
from .builtin import builtin_model_path
from . import tools as tool_calls
from .chat_template import CHAT_FORMATS, ChatTemplate
from .format import UPGFile
from .grammar import Grammar, Matcher, TokenTable
from .sampling import SamplingParams
from .tokenizer import Tokenizer

KV_TYPES = ("f16", "f32")
# ggml type codes of llama-cpp-python's type_k / type_v that the KV cache has
_GGML_KV_TYPES = {0: "f32", 1: "f16"}
# llama-cpp-python's LLAMA_DEFAULT_SEED (and LangChain's -1): a random seed
_RANDOM_SEEDS = (None, -1, 0xFFFFFFFF)
# llama-cpp-python constructor arguments that have no meaning here: accepted and ignored
# (docs/API.md says why for each)
_NOT_APPLICABLE = frozenset({
    "split_mode", "tensor_split", "rpc_servers", "vocab_only", "use_mmap", "use_mlock", "kv_overrides",
    "n_ubatch", "n_threads_batch", "rope_scaling_type", "rope_freq_base", "rope_freq_scale", "yarn_ext_factor",
    "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "offload_kqv", "flash_attn",
    "op_offload", "swa_full", "no_perf", "lora_scale", "numa", "spm_infill", "f16_kv", "n_parts", "device"})
# ... and those for features this engine does not have: accepted at their "off" value only
_UNSUPPORTED = ("lora_base", "lora_path", "chat_handler", "draft_model", "tokenizer")
# llama-cpp-python's LLAMA_POOLING_TYPE_*: UNSPECIFIED (-1) pools by mean, as MEAN (1)
POOLING = {-1: "mean", 0: "none", 1: "mean", 2: "cls", 3: "last"}
# fill-in-the-middle token names (prefix, suffix, middle) as the vocabularies that have them spell them
_FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))


@dataclasses.dataclass(frozen=True)
class LlamaState:
    """A saved context: the tokens in it, the logits after the last one and the KV cache."""

    input_ids: np.ndarray  # int32 [n_tokens]
    scores: np.ndarray     # float32 [n_tokens or 1, n_vocab], as `Llama.scores`
    kv: np.ndarray         # uint8: the engine's KV cache of the n_tokens positions


@dataclasses.dataclass
class _Piece:
    """One step of generated output: new text and the logprob entries of the tokens it completes;
    the last piece also has the finish reason and the number of tokens generated."""

    text: str
    logprobs: list[dict[str, Any]]
    finish_reason: str | None = None
    n_generated: int = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many trailing bytes start a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return back if need > back else 0
    return 0


def _stop_prefix_tail(data: bytes, stops: Sequence[bytes]) -> int:
    """Length of the longest suffix of data that begins some stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(data)), best, -1):
            if data.endswith(s[:n]):
                best = n
                break
    return best


# llama-cpp-python's StoppingCriteriaList: callables (input_ids, logits) -> bool, or None.
StoppingCriteria = Sequence[Callable[[np.ndarray, np.ndarray], bool]] | None
# llama-cpp-python's LogitsProcessorList: callables (input_ids, logits) -> new logits, or None.
LogitsProcessors = Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]] | None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


class Llama:
    """A model loaded from a .upg file with one inference context.

    Takes llama-cpp-python's constructor arguments (docs/API.md lists which apply and which are
    accepted without effect); the ones below are those that do something here.

    Args:
        model_path: the .upg file; None loads the built-in model.
        n_gpu_layers: 0 runs on the CPU; any other number runs the whole model on the GPU where the
            build has one (as llama-cpp-python's CPU builds, the CPU otherwise); None: `backend` decides.
        main_gpu: the GPU to use (0: the only one there is).
        n_ctx: context length in tokens; 0 takes the model's `max_position_embeddings`.
        n_threads: CPU threads (None: all cores).
        n_batch: prompt tokens evaluated per engine call.
        seed: sampler RNG seed (None, -1 or 0xFFFFFFFF: a random one).
        logits_all: keep the logits of every evaluated token in `scores` (needed for prompt logprobs).
        embedding: accepted for llama-cpp-python's sake: `embed` works either way.
        pooling_type: how `embed` pools token embeddings, one of POOLING (llama-cpp-python's codes).
        last_n_tokens_size: how many recent tokens the repeat penalties look at.
        kv_type: KV cache element type, one of KV_TYPES (or llama-cpp-python's `type_k`/`type_v`:
            0 f32, 1 f16).
        chat_format: one of the file's chat templates, or "chatml" (None: the file's "default").
        chat_template: a Jinja2 chat template that replaces the file's.
        verbose: print load information to stderr.
        backend: "cpu", "metal" (Apple GPUs; builds for macOS only) or "auto": Metal where the build
            has it and a GPU opens, else the CPU. A `_core.MetalGpu` object runs the Metal graph on it
            (the tests pass the CPU harness this way). docs/METAL.md says what has run where.

    Raises:
        FileNotFoundError: the file (or, with no path, the built-in model) does not exist.
        UPGFormatError: the file is not a valid model.
        ValueError: a bad argument, or one asking for a feature this engine does not have (LoRA,
            a draft model, a chat handler, another tokenizer).
        TypeError: an argument llama-cpp-python does not have either.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, n_gpu_layers: int | None = None,
                 main_gpu: int = 0, n_ctx: int = 4096, n_threads: int | None = None, n_batch: int = 512,
                 seed: int | None = None, logits_all: bool = False, embedding: bool = False,
                 pooling_type: int = -1, last_n_tokens_size: int = 64, kv_type: str = "f16",
                 type_k: int | None = None, type_v: int | None = None, chat_format: str | None = None,
                 chat_template: str | None = None, verbose: bool = False, backend: Any = "auto", **llama_cpp_kw: Any):
        unknown = sorted(set(llama_cpp_kw) - _NOT_APPLICABLE - set(_UNSUPPORTED))
        if unknown:
            raise TypeError(f"Llama() got unexpected argument(s): {', '.join(unknown)}")
        for name in _UNSUPPORTED:
            if llama_cpp_kw.get(name) is not None:
                raise ValueError(f"{name} is not supported by upg-backend (pass None)")
        if not isinstance(n_ctx, int) or n_ctx < 0:
            raise ValueError(f"n_ctx must be a non-negative integer, got {n_ctx!r}")
        if not isinstance(n_batch, int) or n_batch <= 0:
            raise ValueError(f"n_batch must be a positive integer, got {n_batch!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads <= 0):
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if type_k is not None or type_v is not None:
            if type_k != type_v or type_k not in _GGML_KV_TYPES:
                raise ValueError(f"type_k and type_v must both be 0 (f32) or 1 (f16), got {type_k!r}, {type_v!r}")
            kv_type = _GGML_KV_TYPES[type_k]
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if pooling_type not in POOLING:
            raise ValueError(f"pooling_type must be one of {sorted(POOLING)} (llama-cpp-python's "
                             f"LLAMA_POOLING_TYPE_*; rank pooling is not supported), got {pooling_type!r}")
        if n_gpu_layers is not None and (isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int)):
            raise ValueError(f"n_gpu_layers must be an integer, got {n_gpu_layers!r}")
        if main_gpu != 0:
            raise ValueError(f"main_gpu must be 0 (the one GPU a build drives), got {main_gpu!r}")
        if n_gpu_layers == 0 and backend == "auto":
            backend = "cpu"
        self.model_path = str(Path(model_path) if model_path is not None else builtin_model_path())
        self.verbose = verbose
        self.n_batch = n_batch
        self.logits_all = logits_all
        self.pooling = POOLING[pooling_type]
        self._sampling = SamplingParams(penalty_last_n=last_n_tokens_size)
        t0 = time.perf_counter()
        upg = UPGFile(self.model_path)
        header = upg.header
        config = upg.config
        self._n_ctx = n_ctx or config.max_position_embeddings
        self._config, self._kv_type = config, kv_type
        self._model = _core.Model(self.model_path, config.engine_config())
        self.backend, device = open_backend(backend)
        self._session = _core.Session(self._model, self._n_ctx, kv_type, n_threads or 0, n_batch, device)
        self.tokenizer = Tokenizer(header.get("tokenizer"), header.get("tokenizer_config"))
        self._n_vocab = int(self._model.n_vocab)
        self._n_embd = int(config.hidden_size)
        self.metadata: dict[str, Any] = {k: v for k, v in header.items() if k != "tokenizer"}
        self._eos_ids = self._end_of_turn_ids(header)
        self.chat_format = chat_format
        self.chat_template = self._chat_template(header, chat_format, chat_template)
        # built on the first constrained generation; a holder, so that views of a Batch share it
        self._tables = SimpleNamespace(token_table=None)
        # a Batch's view: loads a prompt's cached prefix from another slot (upg_backend.batch)
        self._prefix_source: Callable[[Llama, list[int]], None] | None = None
        # what llama-cpp-python's users read back (LlamaIndex: context_params.n_ctx)
        self.context_params = SimpleNamespace(n_ctx=self._n_ctx, n_batch=n_batch, n_threads=n_threads or os.cpu_count(),
                                              embeddings=bool(embedding), logits_all=logits_all)
        # Greedy completions chosen on the backend a chunk at a time (_GreedyAhead): a GPU then runs
        # the passes back to back; on the CPU it would only evaluate tokens past a stop.
        self.greedy_ahead = self.backend != "cpu"
        self.greedy_chunk = GREEDY_CHUNK  # tokens a decode_greedy call asks for (_GreedyAhead)
        # Sampled tokens chosen by Session.eval_sample when nothing on the host needs the logits:
        # the backend cuts the candidates, so only those leave a GPU (the same tokens as eval +
        # sample). The last token's logits then stay on the backend until asked for (scores).
        self.sample_on_backend = True
        self._logits_on_backend = False
        self.model_params = SimpleNamespace(n_gpu_layers=0 if self.backend == "cpu" else -1, main_gpu=main_gpu)
        self._input_ids: list[int] = []
        # The leading positions computed as prompt tokens: only those are reused for a new prompt,
        # so that a prompt's tokens have the same bits whether its prefix was cached or not
        # (generated tokens are computed by the decode kernels; docs/ARCHITECTURE.md "Batch-invariant
        # arithmetic").
        self._prompt_run = 0
        self._prompt_logits: tuple[int, np.ndarray] | None = None  # (position, logits) ending the prompt run
        # With logits_all, rows live in _score_buf (grown by doubling, so appending one token's
        # logits at a time stays linear) and _scores is a view of its first n_tokens rows.
        self._score_buf = self._scores = np.zeros((0, self._n_vocab), dtype=np.float32)
        self.set_seed(int.from_bytes(os.urandom(4), "little") if seed in _RANDOM_SEEDS else seed)
        if verbose:
            print(f"upg: loaded {self.model_path} ({config.architecture}, {config.num_hidden_layers} layers, "
                  f"vocab {self._n_vocab}, n_ctx {self._n_ctx}) on {self.backend} in {time.perf_counter() - t0:.2f}s",
                  file=sys.stderr)

    def _end_of_turn_ids(self, header: Mapping[str, Any]) -> list[int]:
        # generation_config's eos list first (every end-of-turn token), then config's, then the tokenizer's
        ids: list[int] = []
        for source in ((header.get("generation") or {}).get("eos_token_id"),
                       (header.get("config") or {}).get("eos_token_id"), self.tokenizer.eos_id):
            for i in (source if isinstance(source, list) else [source]):
                if isinstance(i, int) and 0 <= i < self._n_vocab and i not in ids:
                    ids.append(i)
        return ids

    def _chat_template(self, header: Mapping[str, Any], chat_format: str | None,
                       source: str | None) -> ChatTemplate | None:
        templates = {**CHAT_FORMATS, **(header.get("chat_templates") or {})}
        if source is None:
            name = chat_format or "default"
            if chat_format is not None and name not in templates:
                raise ValueError(f"the model has no chat template {name!r}; it has: {', '.join(templates)}")
            source = templates.get(name)
        return ChatTemplate(source, self.tokenizer.special_tokens) if source else None

    # ----- low level (llama-cpp-python names) -----

    def _live(self) -> Any:
        if self._session is None:
            raise ValueError("this Llama is closed")
        return self._session

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of UTF-8 `text` (see `Tokenizer.encode`)."""
        if isinstance(text, str):
            raise ValueError("tokenize takes bytes (encode the text as UTF-8)")
        return self.tokenizer.encode(bytes(text).decode("utf-8", errors="replace"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        """The bytes of the tokens; control tokens are left out unless `special`. `prev_tokens`
        (llama-cpp-python's) changes nothing: token bytes do not depend on what came before."""
        return self.tokenizer.decode(tokens, special=special)

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def token_bos(self) -> int:
        """The BOS token id (-1 when the model has none)."""
        return -1 if self.tokenizer.bos_id is None else self.tokenizer.bos_id

    def token_eos(self) -> int:
        """The end-of-sequence token id (-1 when the model has none)."""
        return self._eos_ids[0] if self._eos_ids else -1

    def token_nl(self) -> int:
        """The id of the token that is exactly a newline (-1 when there is none)."""
        ids = self.tokenize(b"\n", add_bos=False)
        return ids[0] if len(ids) == 1 else -1

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, **kwargs: Any) -> Llama:
        """llama-cpp-python downloads GGUF files from the Hugging Face hub here; upg-backend loads
        local .upg files only: `upg convert model.gguf -o model.upg`, then `Llama("model.upg")`."""
        raise ValueError("Llama.from_pretrained (a hub download) is not supported: convert the file with "
                         "`upg convert` and pass its path to Llama()")

    @property
    def n_tokens(self) -> int:
        return len(self._input_ids)

    @property
    def input_ids(self) -> np.ndarray:
        """The tokens in the context, int32 [n_tokens]."""
        return np.asarray(self._input_ids, dtype=np.int32)

    @property
    def scores(self) -> np.ndarray:
        """Logits: float32 [n_tokens, n_vocab] with logits_all, else the last row as [1, n_vocab]."""
        if self._logits_on_backend:  # eval_sample's token's (never with logits_all)
            self._append_scores(self._live().last_logits()[None])
        return self._scores

    def set_seed(self, seed: int) -> None:
        """Re-seeds the sampler's RNG."""
        self._live().set_seed(int(seed) & 0xFFFFFFFF)

    def reset(self) -> None:
        """Forgets the context (the KV cache is reused from position 0)."""
        self._truncate(0)

    def _truncate(self, n: int) -> None:
        self._live().truncate(n)
        del self._input_ids[n:]
        self._prompt_run = min(self._prompt_run, n)
        self._logits_on_backend = False
        if self._prompt_logits is not None and self._prompt_logits[0] > n:
            self._prompt_logits = None
        self._scores = self._scores[:n] if self.logits_all else self._scores[:0]

    def eval(self, tokens: Sequence[int]) -> None:
        """Appends tokens to the context, n_batch at a time (a single token as a generated one).

        Raises:
            ValueError: the context would overflow, or a token id is outside the vocabulary.
        """
        self._eval(tokens, None)

    def _eval(self, tokens: Sequence[int], generated: bool | None) -> None:
        """eval; generated: sampled tokens (decode kernels), False: prompt tokens, None: a single
        token is generated."""
        session = self._live()
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError("eval takes a flat sequence of token ids")
        if len(self._input_ids) + len(tokens) > self._n_ctx:
            raise ValueError(f"{len(self._input_ids) + len(tokens)} tokens exceed the context window of {self._n_ctx}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self._n_vocab):
            raise ValueError(f"token ids must be in 0..{self._n_vocab - 1}")
        if generated is None:
            generated = len(tokens) == 1
        for start in range(0, len(tokens), self.n_batch):
            batch = tokens[start:start + self.n_batch].astype(np.int32)
            logits = np.asarray(session.eval(batch, self.logits_all, generated), dtype=np.float32)
            extends_run = not generated and self._prompt_run == len(self._input_ids)
            self._input_ids.extend(int(t) for t in batch)
            self._append_scores(logits)
            if extends_run:
                self._prompt_run = len(self._input_ids)
                self._prompt_logits = (self._prompt_run, logits[-1].copy())

    def _append_scores(self, logits: np.ndarray) -> None:
        self._logits_on_backend = False
        if not self.logits_all:
            self._scores = logits
            return
        n, need = len(self._scores), len(self._scores) + len(logits)
        if need > len(self._score_buf):
            buf = np.empty((min(self._n_ctx, max(need, 2 * len(self._score_buf))), self._n_vocab), np.float32)
            buf[:n] = self._scores
            self._score_buf = buf
        self._score_buf[n:need] = logits
        self._scores = self._score_buf[:need]

    def _last_logits(self) -> np.ndarray:
        scores = self.scores
        if not len(scores):
            raise ValueError("no logits yet: evaluate at least one token first")
        return scores[-1]

    def _load_prompt(self, tokens: Sequence[int]) -> None:
        """Makes the context hold exactly `tokens`, keeping the KV cache of the common prefix."""
        tokens = list(tokens)
        self._check_prompt(tokens)
        if self._prefix_source is not None:
            self._prefix_source(self, tokens)
        keep = self._reusable(tokens)
        self._truncate(keep)
        if keep == len(tokens):  # the same prompt again: its last token's logits were kept
            self._append_scores(self._prompt_logits[1][None])
            return
        self._eval(tokens[keep:], False)

    def _reusable(self, tokens: Sequence[int]) -> int:
        """Leading positions of the context a prompt can keep: as far as it agrees and was
        computed as prompt tokens, all but the last prompt token (evaluated again for its logits)
        unless the prompt is the one that ended the run and its logits were kept."""
        keep = min(_common_prefix(self._input_ids, tokens), self._prompt_run)
        if keep == len(tokens) and not self.logits_all and self._prompt_logits is not None \
                and self._prompt_logits[0] == keep:
            return keep
        return min(keep, len(tokens) - 1)

    def sample(self, sampling: SamplingParams | None = None, logits: np.ndarray | None = None) -> int:
        """Samples the next token from the last logits (or `logits`), with the recent tokens as penalty history."""
        params = sampling or self._sampling
        row = self._last_logits() if logits is None else logits
        return int(self._live().sample(np.ascontiguousarray(row, dtype=np.float32), params.to_core(), self._history(params)))

    def _history(self, params: SamplingParams) -> np.ndarray:
        """The recent tokens the penalties look at."""
        return np.asarray(self._input_ids[-params.penalty_last_n:] if params.penalty_last_n else [], dtype=np.int32)

    def _eval_sample(self, token: int, params: SamplingParams, core: _core.SamplingParams) -> int:
        """_eval([token], True) then sample(params) in one call on the backend (Session.eval_sample;
        core: params.to_core()). The token's logits stay there until `scores` asks for them."""
        if len(self._input_ids) + 1 > self._n_ctx:
            raise ValueError(f"{len(self._input_ids) + 1} tokens exceed the context window of {self._n_ctx}")
        session = self._live()
        self._input_ids.append(token)
        try:
            token = int(session.eval_sample(token, core, self._history(params)))
        except BaseException:
            if session.n_past < len(self._input_ids):  # refused before the eval (a bad bias)
                self._input_ids.pop()
            else:  # evaluated, then nothing to sample (every token banned)
                self._logits_on_backend = True
            raise
        self._logits_on_backend = True
        return token

    def generate(self, tokens: Sequence[int], sampling: SamplingParams | None = None, *, reset: bool = True,
                 **sampling_kw: Any) -> Iterator[int]:
        """Evaluates `tokens` and yields sampled tokens forever; each is evaluated when the next is asked for.

        Args:
            tokens: the prompt (the KV cache of its common prefix with the context is kept).
            sampling: sampling parameters; `**sampling_kw` override single fields.
            reset: False appends `tokens` to the current context instead.
        """
        if "temp" in sampling_kw:  # llama-cpp-python's name in generate()
            sampling_kw["temperature"] = sampling_kw.pop("temp")
        params = SamplingParams.from_kwargs(sampling or self._sampling, **sampling_kw)
        if reset:
            self._load_prompt(tokens)
        else:
            self._eval(tokens, False)
        if params.seed is not None:
            self.set_seed(params.seed)
        token, core = self.sample(params), params.to_core()
        while True:
            yield token
            if self.sample_on_backend and not self.logits_all:
                token = self._eval_sample(token, params, core)
            else:
                self._eval([token], True)
                token = self.sample(params)

    # ----- generation -----

    def _check_text_fits(self, text: str) -> None:
        """Refuses, before tokenizing it, a text too long for the context whatever its tokens are
        (tokenizing megabytes would hold the interpreter for seconds)."""
        least = len(text.encode("utf-8")) // self.tokenizer.max_token_bytes
        if least >= self._n_ctx:
            raise ValueError(f"Requested tokens (at least {least}) exceed context window of {self._n_ctx}")

    def _check_prompt(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise ValueError("the prompt is empty (and the model has no BOS token to start from)")
        if len(tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        if min(tokens) < 0 or max(tokens) >= self._n_vocab:
            raise ValueError(f"token ids must be in 0..{self._n_vocab - 1}")

    def _params(self, sampling: SamplingParams | None, tfs_z: float | None, mirostat_mode: int,
                **fields: Any) -> SamplingParams:
        """The sampling struct of one call: `sampling` (or this Llama's defaults) with the named fields set."""
        if mirostat_mode:
            raise ValueError("mirostat sampling is not supported (mirostat_mode must be 0)")
        if tfs_z is not None and tfs_z != 1.0:
            raise ValueError("tail-free sampling is not supported (tfs_z must be 1.0; llama.cpp removed it)")
        params = SamplingParams.from_kwargs(sampling or self._sampling, **fields)
        outside = [t for t in params.logit_bias if t >= self._n_vocab]
        if outside:
            raise ValueError(f"logit_bias token {outside[0]} is outside the vocabulary (0..{self._n_vocab - 1})")
        return params

    def _grammar(self, grammar: Any, response_format: Mapping[str, Any] | None,
                 tools: tool_calls.ToolChoice | None = None) -> Grammar | None:
        """The one grammar a call runs under: `grammar=` (a LlamaGrammar or Grammar), the
        response_format's, or the tool choice's."""
        if grammar is not None and not isinstance(grammar, Grammar):
            raise ValueError(f"grammar must be a LlamaGrammar or upg_backend.grammar.Grammar, got {type(grammar).__name__}")
        found = [g for g in (grammar, Grammar.from_response_format(response_format),
                             tools.grammar() if tools else None) if g is not None]
        if len(found) > 1:
            raise ValueError("grammar, response_format and tool_choice each constrain the output: pass only one")
        return found[0] if found else None

    def _matcher(self, grammar: Grammar | None) -> Matcher | None:
        if grammar is None:
            return None
        if self._tables.token_table is None:
            self._tables.token_table = TokenTable(self.tokenizer.to_json(), self._n_vocab, self._eos_ids)
        return Matcher(grammar, self._tables.token_table)

    def _host_needs_logits(self, grammar: Grammar | None, logprobs: int | None, stopping_criteria: StoppingCriteria,
                           logits_processor: LogitsProcessors) -> bool:
        return bool(grammar is not None or logprobs is not None or stopping_criteria or logits_processor
                    or self.logits_all)

    def _greedy_ahead(self, sampling: SamplingParams, grammar: Grammar | None, logprobs: int | None,
                      stopping_criteria: StoppingCriteria, logits_processor: LogitsProcessors) -> _GreedyAhead | None:
        """Greedy tokens chosen on a GPU backend, when nothing on the host needs the logits."""
        host = self._host_needs_logits(grammar, logprobs, stopping_criteria, logits_processor)
        return _GreedyAhead(self) if self.greedy_ahead and sampling.plain_greedy and not host else None

    def _stream(self, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int | None,
                stop: str | Sequence[str] | None, logprobs: int | None, grammar: Grammar | None,
                stopping_criteria: StoppingCriteria, logits_processor: LogitsProcessors) -> Iterator[_Piece]:
        """The one generator behind every completion: tokens -> safe text pieces.

        Text is held back while it could be the start of a stop string or an incomplete UTF-8
        character, so no piece ever holds part of a stop string or a broken character.
        """
        stops = [s.encode("utf-8") for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        matcher = self._matcher(grammar)
        ahead = self._greedy_ahead(sampling, grammar, logprobs, stopping_criteria, logits_processor)
        # the tokens after the first by Session.eval_sample (the first is sampled from the prompt's logits)
        on_backend = ahead is None and self.sample_on_backend and \
            not self._host_needs_logits(grammar, logprobs, stopping_criteria, logits_processor)
        core = sampling.to_core()
        self._load_prompt(prompt)
        room = self._n_ctx - len(prompt)
        limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        if sampling.seed is not None:
            self.set_seed(sampling.seed)
        out = b""          # every generated byte so far
        emitted = 0        # bytes of `out` already sent
        pending: list[dict[str, Any]] = []  # logprob entries not sent yet
        finish, n, token = "length", 0, -1
        try:
            while n < limit:
                if ahead is not None and n > 0:
                    token = ahead.next(token, limit - n)
                elif on_backend and n > 0:
                    token = self._eval_sample(token, sampling, core)
                else:
                    logits = self._last_logits()
                    if stopping_criteria and any(c(self.input_ids, logits) for c in stopping_criteria):
                        finish = "stop"
                        break
                    for process in logits_processor or ():
                        logits = np.asarray(process(self.input_ids, logits.copy()), dtype=np.float32)
                    if matcher is not None:
                        logits = matcher.mask(logits)
                    token = self.sample(sampling, logits)
                if token in self._eos_ids:
                    finish = "stop"
                    break
                n += 1
                piece = self.tokenizer.token_bytes(token)
                if logprobs is not None:
                    entry = self._logprob_entry(token, piece, logprobs)
                    pending.append({**entry, "offset": len(out), "text_offset": len(out.decode("utf-8", errors="ignore"))})
                out += piece
                hit = min((i for s in stops if (i := out.find(s, max(0, emitted - len(s) + 1))) >= 0), default=-1)
                if hit >= 0:
                    out = out[:hit]
                    finish = "stop"
                    break
                if matcher is not None:
                    matcher.consume(token)
                    if matcher.finished():
                        finish = "stop"
                        break
                safe = len(out) - max(_incomplete_utf8_tail(out), _stop_prefix_tail(out, stops))
                if safe > emitted:
                    sent = [e for e in pending if e["offset"] < safe]
                    pending = pending[len(sent):]
                    yield _Piece(out[emitted:safe].decode("utf-8", errors="ignore"), sent)
                    emitted = safe
                if n < limit and ahead is None and not on_backend:
                    self._eval([token], True)
        finally:  # also when the consumer stops reading
            if ahead is not None:
                ahead.settle()
        yield _Piece(out[emitted:].decode("utf-8", errors="ignore"),
                     [e for e in pending if e["offset"] < len(out)], finish, n)

    def _logprob_entry(self, token: int, piece: bytes, top: int) -> dict[str, Any]:
        """The log-probability (under the raw model logits) of a sampled token and of the `top` best."""
        lp = _log_softmax(self._last_logits())
        best = np.argsort(-lp)[:top] if top > 0 else []
        alternatives = [(self.tokenizer.token_bytes(int(t)), float(lp[t])) for t in best]
        return {"token": piece, "logprob": float(lp[token]), "top": alternatives}

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            self._check_text_fits(prompt)
            tokens = self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            if not tokens and self.tokenizer.bos_id is not None:
                tokens = [self.tokenizer.bos_id]
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            tokens = [int(t) for t in prompt]
        else:
            raise ValueError("a prompt is a string or a list of token ids")
        self._check_prompt(tokens)
        return tokens

    def _fim_ids(self) -> tuple[int, int, int] | None:
        """The vocabulary's fill-in-the-middle tokens (prefix, suffix, middle), if it has them."""
        for names in _FIM_TOKENS:
            ids = [self.tokenizer.token_id(n) for n in names]
            if all(i is not None for i in ids):
                return ids[0], ids[1], ids[2]
        return None

    def create_completion(self, prompt: str | Sequence[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float | None = None, top_p: float | None = None, min_p: float | None = None,
                          typical_p: float | None = None, logprobs: int | None = None, echo: bool = False,
                          stop: str | Sequence[str] | None = None, frequency_penalty: float | None = None,
                          presence_penalty: float | None = None, repeat_penalty: float | None = None,
                          top_k: int | None = None, stream: bool = False, seed: int | None = None,
                          tfs_z: float | None = None, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                          mirostat_eta: float = 0.1, model: str | None = None,
                          stopping_criteria: StoppingCriteria = None, logits_processor: LogitsProcessors = None,
                          grammar: Any = None, logit_bias: Mapping[Any, float] | None = None, *,
                          response_format: Mapping[str, Any] | None = None,
                          stream_options: Mapping[str, Any] | None = None, sampling: SamplingParams | None = None,
                          **sampling_kw: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Completes a prompt: llama-cpp-python's `create_completion`, its arguments in its order.

        Args:
            prompt: text (special-token strings in it are read as tokens) or token ids.
            suffix: text that follows the completion: with a vocabulary that has fill-in-the-middle
                tokens the model fills the gap between prompt and suffix; otherwise the suffix is
                appended to the text, as llama-cpp-python does.
            max_tokens: tokens to generate at most; None or <= 0: until the context is full.
            temperature, top_p, min_p, typical_p, frequency_penalty, presence_penalty,
                repeat_penalty, top_k, seed, logit_bias: sampling fields (None: `sampling`'s, or
                SamplingParams' defaults).
            logprobs: include each token's log-probability and those of its `logprobs` best alternatives.
            echo: start the text with the prompt.
            stop: strings that end the completion (not included in the text).
            stream: return an iterator of `text_completion` chunks instead of one dict.
            tfs_z, mirostat_mode, mirostat_tau, mirostat_eta: tail-free and mirostat sampling are not
                implemented: tfs_z must be 1 (or None) and mirostat_mode 0.
            model: the name the result carries (default: the model path).
            stopping_criteria: callables `(input_ids, logits) -> bool`, asked before each new token
                (as llama-cpp-python's); the first True ends the completion with finish_reason "stop".
            logits_processor: callables `(input_ids, logits) -> logits`, applied in turn before sampling.
            grammar: a `LlamaGrammar` (GBNF) or `upg_backend.grammar.Grammar` the output must match.
            response_format: `{"type": "json_object"}` (optionally with a `"schema"`) or
                `{"type": "json_schema", "json_schema": {"schema": ...}}`: the output is constrained
                to JSON (matching the schema) while sampling.
            stream_options: `{"include_usage": True}` ends a stream with a chunk that has `usage`
                and no choices (OpenAI's).
            sampling: sampling parameters; `**sampling_kw` (penalty_last_n=...) set more fields.

        Returns:
            A `text_completion` dict (`choices[0]` has `text`, `logprobs`, `finish_reason` "stop" or
            "length"; `usage` counts tokens), or with stream=True an iterator of such chunks.

        Raises:
            ValueError: bad arguments, a bad grammar, or a prompt that does not fit in the context.
        """
        params = self._params(sampling, tfs_z, mirostat_mode, temperature=temperature, top_p=top_p, min_p=min_p,
                              typical_p=typical_p, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k,
                              seed=seed, logit_bias=logit_bias, **sampling_kw)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"logprobs must be a non-negative integer, got {logprobs!r}")
        if suffix is not None and not isinstance(suffix, str):
            raise ValueError("suffix must be a string")
        constraint = self._grammar(grammar, response_format)
        tokens = self._prompt_tokens(prompt)
        fim = self._fim_ids() if suffix else None
        if fim:  # llama-cpp-python's order: prefix token, prompt, suffix token, suffix, middle token
            tokens = [fim[0], *tokens, fim[1], *self.tokenize(suffix.encode("utf-8"), add_bos=False), fim[2]]
            self._check_prompt(tokens)
        tail = suffix if suffix and not fim else ""
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": model or self.model_path}
        prefix = self.detokenize(tokens).decode("utf-8", errors="ignore") if echo else ""
        pieces = self._stream(tokens, params, max_tokens, stop, logprobs, constraint, stopping_criteria,
                              logits_processor)

        def chunk(text: str, lp: dict | None, finish: str | None) -> dict[str, Any]:
            return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

        def usage(n_gen: int) -> dict[str, int]:
            return {"prompt_tokens": len(tokens), "completion_tokens": n_gen, "total_tokens": len(tokens) + n_gen}

        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                offset = len(prefix)
                for i, piece in enumerate(pieces):
                    text = (prefix if i == 0 else "") + piece.text + (tail if piece.finish_reason else "")
                    lp = None if logprobs is None else _completion_logprobs(piece.logprobs, offset)
                    offset += len(piece.text)
                    yield chunk(text, lp, piece.finish_reason)
                    if piece.finish_reason and (stream_options or {}).get("include_usage"):
                        yield {**meta, "choices": [], "usage": usage(piece.n_generated)}
            return chunks()
        collected = list(pieces)
        entries = [e for p in collected for e in p.logprobs]
        result = chunk(prefix + "".join(p.text for p in collected) + tail,
                       None if logprobs is None else _completion_logprobs(entries, len(prefix)),
                       collected[-1].finish_reason)
        result["usage"] = usage(collected[-1].n_generated)
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Same as `create_completion` (positional arguments in llama-cpp-python's order)."""
        return self.create_completion(*args, **kwargs)

    def _chat_prompt(self, messages: Sequence[Mapping[str, Any]], tools: tool_calls.ToolChoice | None,
                     raw_tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """The prompt tokens of a conversation (tool calls and results rendered, content parts joined)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass chat_template= to Llama or use create_completion")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("messages must be a list of objects")
        chat = [{**m, "content": _text_content(m.get("content"))} if "content" in m else dict(m) for m in messages]
        if self.chat_template.knows_tools:
            text = self.chat_template.render(chat, add_generation_prompt=True, tools=raw_tools)
        else:
            text = self.chat_template.render(tool_calls.render_messages(chat, tools), add_generation_prompt=True)
        self._check_text_fits(text)
        tokens = self.tokenizer.encode(text, add_bos=False, special=True)
        self._check_prompt(tokens)
        return tokens

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]],
                               functions: Sequence[Mapping[str, Any]] | None = None, function_call: Any = None,
                               tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
                               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                               min_p: float | None = None, typical_p: float | None = None, stream: bool = False,
                               stop: str | Sequence[str] | None = None, seed: int | None = None,
                               response_format: Mapping[str, Any] | None = None, max_tokens: int | None = None,
                               presence_penalty: float | None = None, frequency_penalty: float | None = None,
                               repeat_penalty: float | None = None, tfs_z: float | None = None,
                               mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: str | None = None, logits_processor: LogitsProcessors = None,
                               grammar: Any = None, logit_bias: Mapping[Any, float] | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None, *,
                               stopping_criteria: StoppingCriteria = None,
                               stream_options: Mapping[str, Any] | None = None,
                               sampling: SamplingParams | None = None,
                               **sampling_kw: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answers a conversation, rendered with the model's chat template: llama-cpp-python's
        `create_chat_completion`, its arguments in its order.

        Args:
            messages: dicts with `role` ("system", "user", "assistant", "tool") and `content` (a
                string, text parts `[{"type": "text", "text": ...}]`, or null beside `tool_calls`).
            functions, function_call: the older spelling of tools and tool_choice.
            tools: OpenAI tool definitions; `tool_choice` "auto" (default), "none", "required" or a
                function (upg_backend.tools). Calls come back as `message.tool_calls` with
                finish_reason "tool_calls".
            response_format, grammar, logits_processor, stopping_criteria, stream_options and the
                sampling fields: as in `create_completion`.
            max_tokens: tokens to generate at most; None: until the context is full.
            stop: strings that end the answer (not included). Every end-of-turn token stops too.
            stream: return an iterator of `chat.completion.chunk` dicts instead of one dict.
            logprobs: include each token's log-probability; `top_logprobs` best alternatives with it.

        Returns:
            A `chat.completion` dict (`choices[0].message` with `role` and `content`,
            `finish_reason`, `usage`), or with stream=True an iterator of chunks: the first with
            `delta.role`, then `delta.content` pieces, the last with `finish_reason`. When tool
            calls are possible the answer is complete before it is streamed: its content and its
            `delta.tool_calls` come in one chunk each.

        Raises:
            ValueError: bad messages or arguments, a model without a chat template, or a prompt
                that does not fit in the context.
        """
        params = self._params(sampling, tfs_z, mirostat_mode, temperature=temperature, top_p=top_p, min_p=min_p,
                              typical_p=typical_p, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k,
                              seed=seed, logit_bias=logit_bias, **sampling_kw)
        if top_logprobs is not None and (not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20):
            raise ValueError(f"top_logprobs must be an integer in 0..20, got {top_logprobs!r}")
        if functions is not None and tools is None:
            tools = [{"type": "function", "function": f} for f in functions]
            tool_choice = function_call
        if tools is None and tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice needs tools")
        plan = None
        if tools is not None:
            plan = tool_calls.ToolChoice(tools, tool_choice, self.tokenizer.token_id(tool_calls.OPEN) is not None)
        constraint = self._grammar(grammar, response_format, plan)
        tokens = self._chat_prompt(messages, plan, tools)
        want = (top_logprobs or 0) if logprobs else None
        meta = {"id": f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model or self.model_path}
        pieces = self._stream(tokens, params, max_tokens, stop, want, constraint, stopping_criteria, logits_processor)
        include_usage = bool((stream_options or {}).get("include_usage"))

        def usage(n_gen: int) -> dict[str, int]:
            return {"prompt_tokens": len(tokens), "completion_tokens": n_gen, "total_tokens": len(tokens) + n_gen}

        def choice_chunk(delta: dict[str, Any], lp: Any = None, finish: str | None = None) -> dict[str, Any]:
            return {**meta, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        def answer() -> dict[str, Any]:
            collected = list(pieces)
            text = "".join(p.text for p in collected)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = collected[-1].finish_reason
            if plan is not None and plan.choice != "none":
                content, calls = tool_calls.parse(text)
                if calls:
                    message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            lp = None if want is None else {"content": _chat_logprobs([e for p in collected for e in p.logprobs])}
            return {**meta, "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}],
                    "usage": usage(collected[-1].n_generated)}

        if not stream:
            return answer()

        def chunks() -> Iterator[dict[str, Any]]:
            yield choice_chunk({"role": "assistant"})
            if plan is not None and plan.choice != "none":  # the whole answer first: calls are parsed from it
                result = answer()
                choice = result["choices"][0]
                if choice["message"]["content"]:
                    yield choice_chunk({"content": choice["message"]["content"]}, choice["logprobs"])
                if "tool_calls" in choice["message"]:
                    yield choice_chunk({"tool_calls": [{"index": i, **c}
                                                       for i, c in enumerate(choice["message"]["tool_calls"])]})
                yield choice_chunk({}, None, choice["finish_reason"])
                if include_usage:
                    yield {**meta, "choices": [], "usage": result["usage"]}
                return
            for piece in pieces:
                lp = None if want is None else {"content": _chat_logprobs(piece.logprobs)}
                if piece.text or lp and lp["content"]:
                    yield choice_chunk({"content": piece.text}, lp)
                if piece.finish_reason:
                    yield choice_chunk({}, None, piece.finish_reason)
                    if include_usage:
                        yield {**meta, "choices": [], "usage": usage(piece.n_generated)}
        return chunks()

    # ----- embeddings -----

    def _embed_one(self, text: str | Sequence[int], truncate: bool) -> tuple[np.ndarray, int]:
        """(the hidden state of every token after the final norm [n, n_embd], n) of one input,
        evaluated from position 0; the context is empty afterwards."""
        if isinstance(text, str):
            if not truncate:
                self._check_text_fits(text)
            else:  # the first n_ctx tokens lie within this many characters (each is at least a byte)
                text = text[:self._n_ctx * self.tokenizer.max_token_bytes]
            tokens = self.tokenize(text.encode("utf-8"), add_bos=True)
        elif isinstance(text, (list, tuple)) and all(isinstance(t, int) for t in text):
            tokens = list(text)
        else:
            raise ValueError("embedding input must be a string, a list of strings or a list of token ids")
        if not tokens:
            tokens = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        if not tokens:
            raise ValueError("cannot embed empty text with a model that has no BOS token")
        if len(tokens) > self._n_ctx:
            if not truncate:
                raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
            tokens = tokens[:self._n_ctx]
        if min(tokens) < 0 or max(tokens) >= self._n_vocab:
            raise ValueError(f"token ids must be in 0..{self._n_vocab - 1}")
        self._truncate(0)
        try:
            hidden = np.asarray(self._live().eval_hidden(np.asarray(tokens, dtype=np.int32)), dtype=np.float32)
        finally:
            self._live().truncate(0)  # the embedded tokens are not a context to continue
        return hidden, len(tokens)

    def _pool(self, hidden: np.ndarray, normalize: bool) -> list:
        rows = {"none": hidden, "mean": hidden.mean(axis=0), "cls": hidden[0], "last": hidden[-1]}[self.pooling]
        if normalize:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
        return rows.tolist()

    def embed(self, input: str | Sequence[str] | Sequence[int], normalize: bool = False, truncate: bool = True,
              return_count: bool = False) -> Any:
        """Embeddings of text (llama-cpp-python's `embed`): the model's last hidden state after the
        final norm, pooled as `pooling_type` says (default mean over the tokens; "none" gives one
        vector per token).

        Args:
            input: a string, token ids, or a list of strings.
            normalize: scale each embedding to unit length.
            truncate: cut inputs longer than n_ctx (else ValueError).
            return_count: also return the number of tokens embedded.

        Returns:
            One embedding (a list of floats; per-token lists with pooling "none") for one input, a
            list of them for a list of strings; with return_count, (that, token count).
        """
        single = isinstance(input, str) or (isinstance(input, (list, tuple)) and bool(input) and
                                            all(isinstance(t, int) for t in input))
        inputs = [input] if single else list(input)
        if not inputs:
            raise ValueError("nothing to embed")
        out, count = [], 0
        for text in inputs:
            hidden, n = self._embed_one(text, truncate)
            out.append(self._pool(hidden, normalize))
            count += n
        result = out[0] if single else out
        return (result, count) if return_count else result

    def create_embedding(self, input: str | Sequence[str], model: str | None = None) -> dict[str, Any]:
        """`embed` in OpenAI's and llama-cpp-python's response shape:
        `{"object": "list", "data": [{"object": "embedding", "embedding", "index"}], "model", "usage"}`."""
        inputs = [input] if isinstance(input, str) else list(input)
        data, count = [], 0
        for i, text in enumerate(inputs):
            vector, n = self.embed(text, return_count=True)
            data.append({"object": "embedding", "embedding": vector, "index": i})
            count += n
        return {"object": "list", "data": data, "model": model or self.model_path,
                "usage": {"prompt_tokens": count, "total_tokens": count}}

    def n_embd(self) -> int:
        """The size of an embedding (the model's hidden size)."""
        return self._n_embd

    def set_cache(self, cache: Any) -> None:
        """Accepted (llama-cpp-python's); not needed: the context keeps the longest shared prefix."""

    # ----- state and lifetime -----

    def save_state(self) -> LlamaState:
        """The context's tokens, logits and KV cache (restored by `load_state`)."""
        return LlamaState(self.input_ids.copy(), self.scores.copy(), self._live().save_kv())

    def load_state(self, state: LlamaState) -> None:
        """Restores a saved context, KV cache included: nothing is evaluated again.

        Raises:
            ValueError: the state comes from another model, kv_type or a larger context.
        """
        self._live().load_kv(len(state.input_ids), state.kv)
        self._input_ids = [int(t) for t in state.input_ids]
        self._prompt_run = len(self._input_ids)  # as the saved context was computed
        self._prompt_logits = None
        self._score_buf = self._scores = np.array(state.scores, dtype=np.float32)
        self._logits_on_backend = False

    def close(self) -> None:
        """Frees the session and the model; the object cannot be used afterwards."""
        self._session = None
        self._model = None

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Tokens per Session.decode_greedy call of a greedy completion on a GPU: the host's work is amortized
# over 8 passes, and at most 7 are evaluated past a stop.
GREEDY_CHUNK = 8


class _GreedyAhead:
    """Greedy tokens from the backend, llm.greedy_chunk at a time (Session.decode_greedy): one call queues a
    chunk's passes back to back on the GPU, with no logits downloaded or sampled on the host.

    next(token) appends `token` to the context and returns the argmax after it; the backend may
    have appended a few tokens past it already, which settle() takes back when the stream ends."""


    def __init__(self, llm: Llama):
        self.llm = llm
        self.ahead: list[int] = []  # argmaxes computed and not yet asked for
        self.used = 0               # how many of the chunk's tokens next() has returned

    def next(self, token: int, room: int) -> int:
        llm = self.llm
        if self.used == len(self.ahead):
            n = max(1, min(llm.greedy_chunk, room, llm._n_ctx - len(llm._input_ids)))
            self.ahead = [int(t) for t in llm._live().decode_greedy(token, n)]
            llm._input_ids.append(token)
            llm._input_ids.extend(self.ahead[:-1])
            self.used = 0
        self.used += 1
        return self.ahead[self.used - 1]

    def settle(self) -> None:
        """Leaves the context as the host loop would have: the tokens returned so far but the last,
        that one evaluated again for its logits."""
        llm = self.llm
        if not self.ahead:
            return
        keep = len(llm._input_ids) - (len(self.ahead) - self.used)  # drops the tokens past the last returned
        last = llm._input_ids[keep - 1]
        llm._truncate(keep - 1)
        llm._eval([last], True)


def _text_content(content: Any) -> Any:
    """A message's content as templates read it: text parts joined (OpenAI's list form), null kept."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ValueError("message content parts must be text parts ({'type': 'text', 'text': ...}); "
                         "this model reads text only")
    return "".join(p["text"] for p in content)


def _completion_logprobs(entries: Sequence[dict[str, Any]], offset: int) -> dict[str, list]:
    """Logprob entries in the `text_completion` layout; text offsets count characters from `offset`."""
    return {"tokens": [e["token"].decode("utf-8", errors="replace") for e in entries],
            "text_offset": [offset + e["text_offset"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t.decode("utf-8", errors="replace"): lp for t, lp in e["top"]} for e in entries]}


def _chat_logprobs(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logprob entries in the `chat.completion` layout (OpenAI's `logprobs.content`)."""
    return [{"token": e["token"].decode("utf-8", errors="replace"), "logprob": e["logprob"], "bytes": list(e["token"]),
             "top_logprobs": [{"token": t.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(t)}
                              for t, lp in e["top"]]}
            for e in entries]
