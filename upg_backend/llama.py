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
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import _core
from .backends import open_backend
from .builtin import builtin_model_path
from .chat_template import ChatTemplate
from .format import UPGFile
from .json_schema import JsonConstraint
from .sampling import SamplingParams
from .tokenizer import Tokenizer

KV_TYPES = ("f16", "f32")
# candidates tried per step by a JSON constraint before the rest of the vocabulary
_CONSTRAINT_CANDIDATES = 64


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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


class Llama:
    """A model loaded from a .upg file with one inference context.

    Args:
        model_path: the .upg file; None loads the built-in model.
        n_ctx: context length in tokens; 0 takes the model's `max_position_embeddings`.
        n_threads: CPU threads (None: all cores).
        n_batch: prompt tokens evaluated per engine call.
        seed: sampler RNG seed (None: a random one).
        logits_all: keep the logits of every evaluated token in `scores` (needed for prompt logprobs).
        kv_type: KV cache element type, one of KV_TYPES.
        chat_format: which of the file's chat templates to use (None: "default").
        chat_template: a Jinja2 chat template that replaces the file's.
        verbose: print load information to stderr.
        backend: "cpu", "metal" (Apple GPUs; builds for macOS only) or "auto": Metal where the build
            has it and a GPU opens, else the CPU. A `_core.MetalGpu` object runs the Metal graph on it
            (the tests pass the CPU harness this way). docs/METAL.md says what has run where.

    Raises:
        FileNotFoundError: the file (or, with no path, the built-in model) does not exist.
        UPGFormatError: the file is not a valid model.
        ValueError: a bad argument.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, n_ctx: int = 4096,
                 n_threads: int | None = None, n_batch: int = 512, seed: int | None = None,
                 logits_all: bool = False, kv_type: str = "f16", chat_format: str | None = None,
                 chat_template: str | None = None, verbose: bool = False, backend: Any = "auto"):
        if not isinstance(n_ctx, int) or n_ctx < 0:
            raise ValueError(f"n_ctx must be a non-negative integer, got {n_ctx!r}")
        if not isinstance(n_batch, int) or n_batch <= 0:
            raise ValueError(f"n_batch must be a positive integer, got {n_batch!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads <= 0):
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        self.model_path = str(Path(model_path) if model_path is not None else builtin_model_path())
        self.verbose = verbose
        self.n_batch = n_batch
        self.logits_all = logits_all
        t0 = time.perf_counter()
        upg = UPGFile(self.model_path)
        header = upg.header
        config = upg.config
        self._n_ctx = n_ctx or config.max_position_embeddings
        self._model = _core.Model(self.model_path, config.engine_config())
        self.backend, device = open_backend(backend)
        self._session = _core.Session(self._model, self._n_ctx, kv_type, n_threads or 0, n_batch, device)
        self.tokenizer = Tokenizer(header.get("tokenizer"), header.get("tokenizer_config"))
        self._n_vocab = int(self._model.n_vocab)
        self.metadata: dict[str, Any] = {k: v for k, v in header.items() if k != "tokenizer"}
        self._eos_ids = self._end_of_turn_ids(header)
        self.chat_template = self._chat_template(header, chat_format, chat_template)
        self._input_ids: list[int] = []
        # With logits_all, rows live in _score_buf (grown by doubling, so appending one token's
        # logits at a time stays linear) and _scores is a view of its first n_tokens rows.
        self._score_buf = self._scores = np.zeros((0, self._n_vocab), dtype=np.float32)
        self.set_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        if verbose:
            print(f"upg: loaded {self.model_path} ({config.architecture}, {config.num_hidden_layers} layers, "
                  f"vocab {self._n_vocab}, n_ctx {self._n_ctx}) in {time.perf_counter() - t0:.2f}s", file=sys.stderr)

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
        templates = header.get("chat_templates") or {}
        if source is None:
            name = chat_format or "default"
            if chat_format is not None and name not in templates:
                raise ValueError(f"the model has no chat template {name!r}; it has: {', '.join(templates) or 'none'}")
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

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The bytes of the tokens; control tokens are left out unless `special`."""
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
        self._scores = self._scores[:n] if self.logits_all else self._scores[:0]

    def eval(self, tokens: Sequence[int]) -> None:
        """Appends tokens to the context, n_batch at a time.

        Raises:
            ValueError: the context would overflow, or a token id is outside the vocabulary.
        """
        session = self._live()
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError("eval takes a flat sequence of token ids")
        if len(self._input_ids) + len(tokens) > self._n_ctx:
            raise ValueError(f"{len(self._input_ids) + len(tokens)} tokens exceed the context window of {self._n_ctx}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self._n_vocab):
            raise ValueError(f"token ids must be in 0..{self._n_vocab - 1}")
        for start in range(0, len(tokens), self.n_batch):
            batch = tokens[start:start + self.n_batch].astype(np.int32)
            logits = np.asarray(session.eval(batch, self.logits_all), dtype=np.float32)
            self._input_ids.extend(int(t) for t in batch)
            self._append_scores(logits)

    def _append_scores(self, logits: np.ndarray) -> None:
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
        if not len(self._scores):
            raise ValueError("no logits yet: evaluate at least one token first")
        return self._scores[-1]

    def _load_prompt(self, tokens: Sequence[int]) -> None:
        """Makes the context hold exactly `tokens`, keeping the KV cache of the common prefix."""
        tokens = list(tokens)
        self._check_prompt(tokens)
        keep = _common_prefix(self._input_ids, tokens)
        keep = min(keep, len(tokens) - 1)  # the last prompt token is evaluated again for its logits
        self._truncate(keep)
        self.eval(tokens[keep:])

    def sample(self, sampling: SamplingParams | None = None, logits: np.ndarray | None = None) -> int:
        """Samples the next token from the last logits (or `logits`), with the recent tokens as penalty history."""
        params = sampling or SamplingParams()
        history = np.asarray(self._input_ids[-params.penalty_last_n:] if params.penalty_last_n else [], dtype=np.int32)
        row = self._last_logits() if logits is None else logits
        return int(self._live().sample(np.ascontiguousarray(row, dtype=np.float32), params.to_core(), history))

    def generate(self, tokens: Sequence[int], sampling: SamplingParams | None = None, *, reset: bool = True,
                 **sampling_kw: Any) -> Iterator[int]:
        """Evaluates `tokens` and yields sampled tokens forever; each is evaluated when the next is asked for.

        Args:
            tokens: the prompt (the KV cache of its common prefix with the context is kept).
            sampling: sampling parameters; `**sampling_kw` override single fields.
            reset: False appends `tokens` to the current context instead.
        """
        params = SamplingParams.from_kwargs(sampling, **sampling_kw)
        if reset:
            self._load_prompt(tokens)
        else:
            self.eval(tokens)
        if params.seed is not None:
            self.set_seed(params.seed)
        while True:
            token = self.sample(params)
            yield token
            self.eval([token])

    # ----- generation -----

    def _check_prompt(self, tokens: Sequence[int]) -> None:
        if not tokens:
            raise ValueError("the prompt is empty (and the model has no BOS token to start from)")
        if len(tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")

    def _stream(self, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int | None,
                stop: str | Sequence[str] | None, logprobs: int | None,
                constraint: JsonConstraint | None, stopping_criteria: StoppingCriteria) -> Iterator[_Piece]:
        """The one generator behind every completion: tokens -> safe text pieces.

        Text is held back while it could be the start of a stop string or an incomplete UTF-8
        character, so no piece ever holds part of a stop string or a broken character.
        """
        stops = [s.encode("utf-8") for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self._load_prompt(prompt)
        room = self._n_ctx - len(prompt)
        limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        if sampling.seed is not None:
            self.set_seed(sampling.seed)
        out = b""          # every generated byte so far
        emitted = 0        # bytes of `out` already sent
        pending: list[dict[str, Any]] = []  # logprob entries not sent yet
        finish, n = "length", 0
        while n < limit:
            logits = self._last_logits()
            if stopping_criteria and any(c(self.input_ids, logits) for c in stopping_criteria):
                finish = "stop"
                break
            if constraint is not None:
                logits = self._constrain(logits, constraint, out)
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
            if constraint is not None and constraint.finished(out):
                finish = "stop"
                break
            safe = len(out) - max(_incomplete_utf8_tail(out), _stop_prefix_tail(out, stops))
            if safe > emitted:
                sent = [e for e in pending if e["offset"] < safe]
                pending = pending[len(sent):]
                yield _Piece(out[emitted:safe].decode("utf-8", errors="ignore"), sent)
                emitted = safe
            if n < limit:
                self.eval([token])
        yield _Piece(out[emitted:].decode("utf-8", errors="ignore"),
                     [e for e in pending if e["offset"] < len(out)], finish, n)

    def _logprob_entry(self, token: int, piece: bytes, top: int) -> dict[str, Any]:
        """The log-probability (under the raw model logits) of a sampled token and of the `top` best."""
        lp = _log_softmax(self._last_logits())
        best = np.argsort(-lp)[:top] if top > 0 else []
        alternatives = [(self.tokenizer.token_bytes(int(t)), float(lp[t])) for t in best]
        return {"token": piece, "logprob": float(lp[token]), "top": alternatives}

    def _constrain(self, logits: np.ndarray, constraint: JsonConstraint, out: bytes) -> np.ndarray:
        """The logits with every token masked (-inf) whose bytes would break the constraint.

        Tokens are tried from the most likely down until _CONSTRAINT_CANDIDATES pass, so the
        sampler still sees the head of the distribution without checking the whole vocabulary.
        """
        masked = np.full_like(logits, -np.inf)
        if constraint.complete(out):
            masked[self._eos_ids] = logits[self._eos_ids]
        found = 0
        for token in np.argsort(-logits):
            token = int(token)
            piece = self.tokenizer.token_bytes(token)
            if piece and not self.tokenizer.is_control(token) and constraint.accepts(out + piece):
                masked[token] = logits[token]
                found += 1
                if found == _CONSTRAINT_CANDIDATES:
                    break
        if not np.isfinite(masked).any():
            raise ValueError("no token of this vocabulary can continue the constrained output")
        return masked

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            if not tokens and self.tokenizer.bos_id is not None:
                tokens = [self.tokenizer.bos_id]
        else:
            tokens = [int(t) for t in prompt]
        self._check_prompt(tokens)
        return tokens

    def create_completion(self, prompt: str | Sequence[int], *, max_tokens: int | None = 16,
                          stop: str | Sequence[str] | None = None, stream: bool = False, echo: bool = False,
                          logprobs: int | None = None, response_format: Mapping[str, Any] | None = None,
                          stopping_criteria: StoppingCriteria = None, sampling: SamplingParams | None = None,
                          **sampling_kw: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Completes a prompt (llama-cpp-python's `create_completion`).

        Args:
            prompt: text (special-token strings in it are read as tokens) or token ids.
            max_tokens: tokens to generate at most; None or <= 0: until the context is full.
            stop: strings that end the completion (not included in the text).
            stream: return an iterator of `text_completion` chunks instead of one dict.
            echo: start the text with the prompt.
            logprobs: include each token's log-probability and those of its `logprobs` best alternatives.
            response_format: `{"type": "json_object"}` (optionally with a `"schema"`) or
                `{"type": "json_schema", "json_schema": {"schema": ...}}`: the output is constrained
                to JSON (matching the schema) while sampling.
            stopping_criteria: callables `(input_ids, logits) -> bool`, asked before each new token
                (as llama-cpp-python's); the first True ends the completion with finish_reason "stop".
            sampling: sampling parameters; `**sampling_kw` (temperature=..., top_k=..., seed=...)
                override single fields.

        Returns:
            A `text_completion` dict (`choices[0]` has `text`, `logprobs`, `finish_reason` "stop" or
            "length"; `usage` counts tokens), or with stream=True an iterator of such chunks without `usage`.

        Raises:
            ValueError: bad arguments, or a prompt that does not fit in the context.
        """
        params = SamplingParams.from_kwargs(sampling, **sampling_kw)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"logprobs must be a non-negative integer, got {logprobs!r}")
        constraint = JsonConstraint.from_response_format(response_format)
        tokens = self._prompt_tokens(prompt)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_path}
        prefix = self.detokenize(tokens).decode("utf-8", errors="ignore") if echo else ""
        pieces = self._stream(tokens, params, max_tokens, stop, logprobs, constraint, stopping_criteria)

        def chunk(text: str, lp: dict | None, finish: str | None) -> dict[str, Any]:
            return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                offset = len(prefix)
                for i, piece in enumerate(pieces):
                    text = (prefix if i == 0 else "") + piece.text
                    lp = None if logprobs is None else _completion_logprobs(piece.logprobs, offset)
                    offset += len(piece.text)
                    yield chunk(text, lp, piece.finish_reason)
            return chunks()
        collected = list(pieces)
        entries = [e for p in collected for e in p.logprobs]
        result = chunk(prefix + "".join(p.text for p in collected),
                       None if logprobs is None else _completion_logprobs(entries, len(prefix)),
                       collected[-1].finish_reason)
        n_gen = collected[-1].n_generated
        result["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n_gen, "total_tokens": len(tokens) + n_gen}
        return result

    def __call__(self, prompt: str | Sequence[int], **kwargs: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Same as `create_completion`."""
        return self.create_completion(prompt, **kwargs)

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], *, max_tokens: int | None = None,
                               stop: str | Sequence[str] | None = None, stream: bool = False,
                               logprobs: bool = False, top_logprobs: int | None = None,
                               response_format: Mapping[str, Any] | None = None,
                               tools: Sequence[Mapping[str, Any]] | None = None,
                               stopping_criteria: StoppingCriteria = None,
                               sampling: SamplingParams | None = None,
                               **sampling_kw: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answers a conversation, rendered with the model's chat template (llama-cpp-python's
        `create_chat_completion`).

        Args:
            messages: dicts with `role` ("system", "user", "assistant", ...) and `content`.
            max_tokens: tokens to generate at most; None: until the context is full.
            stop: strings that end the answer (not included). Every end-of-turn token stops too.
            stream: return an iterator of `chat.completion.chunk` dicts instead of one dict.
            logprobs: include each token's log-probability; `top_logprobs` best alternatives with it.
            response_format: as in `create_completion`.
            tools: JSON schemas of tools, for templates that describe them.
            stopping_criteria: as in `create_completion`.
            sampling: sampling parameters; `**sampling_kw` override single fields.

        Returns:
            A `chat.completion` dict (`choices[0].message` with `role` and `content`,
            `finish_reason`, `usage`), or with stream=True an iterator of chunks: the first with
            `delta.role`, then `delta.content` pieces, the last with `finish_reason`.

        Raises:
            ValueError: bad messages or arguments, a model without a chat template, or a prompt
                that does not fit in the context.
        """
        params = SamplingParams.from_kwargs(sampling, **sampling_kw)
        if top_logprobs is not None and (not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20):
            raise ValueError(f"top_logprobs must be an integer in 0..20, got {top_logprobs!r}")
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass chat_template= to Llama or use create_completion")
        constraint = JsonConstraint.from_response_format(response_format)
        text = self.chat_template.render(messages, add_generation_prompt=True, tools=tools)
        tokens = self.tokenizer.encode(text, add_bos=False, special=True)
        self._check_prompt(tokens)
        want = (top_logprobs or 0) if logprobs else None
        meta = {"id": f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_path}
        pieces = self._stream(tokens, params, max_tokens, stop, want, constraint, stopping_criteria)

        if stream:
            def chunks() -> Iterator[dict[str, Any]]:
                yield {**meta, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}]}
                for piece in pieces:
                    lp = None if want is None else {"content": _chat_logprobs(piece.logprobs)}
                    if piece.text or lp and lp["content"]:
                        yield {**meta, "choices": [{"index": 0, "delta": {"content": piece.text}, "logprobs": lp,
                                                    "finish_reason": None}]}
                    if piece.finish_reason:
                        yield {**meta, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                    "finish_reason": piece.finish_reason}]}
            return chunks()
        collected = list(pieces)
        n_gen = collected[-1].n_generated
        lp = None if want is None else {"content": _chat_logprobs([e for p in collected for e in p.logprobs])}
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(p.text for p in collected)},
                             "logprobs": lp, "finish_reason": collected[-1].finish_reason}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": n_gen,
                          "total_tokens": len(tokens) + n_gen}}

    # ----- state and lifetime -----

    def save_state(self) -> LlamaState:
        """The context's tokens, logits and KV cache (restored by `load_state`)."""
        return LlamaState(self.input_ids.copy(), self._scores.copy(), self._live().save_kv())

    def load_state(self, state: LlamaState) -> None:
        """Restores a saved context, KV cache included: nothing is evaluated again.

        Raises:
            ValueError: the state comes from another model, kv_type or a larger context.
        """
        self._live().load_kv(len(state.input_ids), state.kv)
        self._input_ids = [int(t) for t in state.input_ids]
        self._score_buf = self._scores = np.array(state.scores, dtype=np.float32)

    def close(self) -> None:
        """Frees the session and the model; the object cannot be used afterwards."""
        self._session = None
        self._model = None

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
