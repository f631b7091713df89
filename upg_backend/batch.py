"""Many sequences at once: one engine pass per step over the tokens of every running request.

`Batch(llama, n_parallel)` holds a `_core.BatchSession` of n_parallel KV slots and a scheduler
thread. Each slot is seen through a `Llama` view (`Batch.views`): the same model, tokenizer and
chat template as `llama`, its own context, so every `Llama` method (completions, chat, stop strings,
grammars, logprobs, streaming) runs unchanged in a request's own thread. A view's evals go to the
scheduler, which merges the evals of every running view into one step: the generated token of
each sequence that is decoding, and chunks of the prompts being admitted (at most `prefill_chunk`
prompt tokens in all per step while others decode, so a long prompt does not stall them). A token's
results depend on its sequence and on whether it was generated or given, never on the step's
other tokens (docs/ARCHITECTURE.md "Batch-invariant arithmetic"): a request gets the same tokens
alone or beside 15 others.

Offline work: `Batch.create_completions(prompts, ...)` and `Batch.create_chat_completions(...)`
run many requests through the slots at once and return their results in order.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from . import _core
from .backends import open_backend
from .llama import Llama, _common_prefix

GATHER_S = 0.002  # how long a step waits for the other running sequences' next tokens


def kv_bytes_per_position(llama: Llama, kv_type: str | None = None) -> int:
    """Bytes of K and V one position of one sequence takes in the cache."""
    c, kv_type = llama._config, kv_type or llama._kv_type
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (2 if kv_type == "f16" else 4)


@dataclass
class _Job:
    """One view's eval, done by one or more steps."""

    slot: int
    tokens: np.ndarray
    generated: bool
    logits_all: bool
    argmax: bool = False  # the last token's argmax, chosen on the backend, instead of its logits
    done: threading.Event = field(default_factory=threading.Event)
    offset: int = 0
    rows: list = field(default_factory=list)
    error: BaseException | None = None


class _SlotSession:
    """What a `Llama` calls on its session, for one slot of the batch."""

    def __init__(self, batch: Batch, slot: int):
        self._batch, self._slot = batch, slot

    @property
    def backend(self) -> str:
        return self._batch._core.backend

    @property
    def n_past(self) -> int:
        return self._batch._core.n_past(self._slot)

    def eval(self, tokens: np.ndarray, logits_all: bool = False, generated: bool | None = None) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if generated is None:
            generated = len(tokens) == 1
        return self._batch._submit(_Job(self._slot, tokens, bool(generated), bool(logits_all)))

    def decode_greedy(self, token: int, n: int) -> np.ndarray:
        """Session.decode_greedy in steps of the batch: appends `token` and n - 1 greedy tokens after
        it, one a step, each the argmax of the logits before it, chosen on the backend (one id comes
        back from a step instead of a row of logits); returns the n argmaxes."""
        out = np.empty(n, dtype=np.int32)
        for i in range(n):
            job = _Job(self._slot, np.array([token], dtype=np.int32), True, False, argmax=True)
            token = out[i] = self._batch._submit(job)
        return out

    def truncate(self, n: int) -> None:
        self._batch._core.truncate(self._slot, n)

    def set_seed(self, seed: int) -> None:
        self._batch._core.set_seed(self._slot, seed)

    def sample(self, logits: np.ndarray, params: Any, history: np.ndarray) -> int:
        return self._batch._core.sample(self._slot, logits, params, history)

    def _unsupported(self, *args: Any) -> Any:
        raise ValueError("a batch slot keeps no saved states and computes no embeddings: use the Llama itself")

    save_kv = load_kv = eval_hidden = _unsupported


class Batch:
    """n_parallel sequences of `llama`'s model evaluated together.

    Args:
        llama: the model (its weights, tokenizer and chat template are shared, not copied).
        n_parallel: slots: sequences that run at once.
        n_ctx: positions of each slot (default: llama's n_ctx).
        kv_type: "f16" or "f32" (default: llama's).
        n_threads: threads of the batch's CPU backend (default: llama's).
        n_batch: the most tokens one step takes.
        prefill_chunk: the most prompt tokens (of all prompts together) a step takes while some
            sequence decodes.
        generated: on CUDA, the generated tokens' kernels: "matvec" (the fastest up to 16
            sequences at once) or "matmul" (the tensor-core mat-mul: the fastest for 32; docs/CUDA.md).

    Raises:
        ValueError: a bad argument, or a backend whose passes hold fewer sequences than n_parallel.
    """

    def __init__(self, llama: Llama, n_parallel: int, *, n_ctx: int | None = None, kv_type: str | None = None,
                 n_threads: int | None = None, n_batch: int | None = None, prefill_chunk: int = 32,
                 generated: str = "matvec"):
        if not isinstance(n_parallel, int) or n_parallel < 1:
            raise ValueError(f"n_parallel must be a positive integer, got {n_parallel!r}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk!r}")
        n_ctx = n_ctx or llama.n_ctx()
        kv_type = kv_type or llama._kv_type
        n_batch = n_batch or max(llama.n_batch, n_parallel)
        if n_batch < n_parallel:
            raise ValueError(f"n_batch ({n_batch}) must hold one token of each of the {n_parallel} slots")
        _, device = open_backend(llama.backend, generated=generated)
        threads = n_threads or llama.context_params.n_threads or 0
        self._core = _core.BatchSession(llama._model, n_parallel, n_ctx, kv_type, threads, n_batch, device)
        self.n_parallel, self.n_ctx, self.n_batch, self.prefill_chunk = n_parallel, n_ctx, n_batch, prefill_chunk
        self.views = [self._view(llama, slot) for slot in range(n_parallel)]
        self._cv = threading.Condition()
        self._pending: dict[int, _Job] = {}
        self._active: set[int] = set()
        self._prefix_lock = threading.Lock()
        self._closed = False
        self.steps = 0          # passes run (tests and benchmarks read them)
        self.prefix_copies = 0  # prompts that started from another slot's prefix
        self._thread = threading.Thread(target=self._run, name="upg-batch", daemon=True)
        self._thread.start()

    def _view(self, llama: Llama, slot: int) -> Llama:
        """A Llama over one slot: shares everything read-only, owns its context."""
        view = copy.copy(llama)
        view._session = _SlotSession(self, slot)
        view._n_ctx = self.n_ctx
        view._input_ids = []
        view._prompt_run = 0
        view._prompt_logits = None
        view._score_buf = view._scores = np.zeros((0, llama.n_vocab()), dtype=np.float32)
        # a slot's evals are the batch's steps: no eval_sample of a Session; greedy streams on a GPU
        # take their argmax there (_SlotSession.decode_greedy), a token a step so that stops end them
        # at once (on the CPU the host's argmax costs less than the step settle() adds at the end)
        view.sample_on_backend = view._logits_on_backend = False
        view.greedy_ahead, view.greedy_chunk = self._core.backend != "cpu", 1
        view.context_params = SimpleNamespace(**{**vars(llama.context_params), "n_ctx": self.n_ctx})
        view._tables = llama._tables
        view._prefix_source = self._load_prefix
        view._batch_slot = slot
        view.set_seed(int.from_bytes(os.urandom(4), "little"))
        return view

    # ----- what the server and offline callers use -----

    def acquire(self, view: Llama) -> None:
        """Marks a view's slot as running a request (the scheduler waits for its evals)."""
        with self._cv:
            self._active.add(view._batch_slot)

    def release(self, view: Llama) -> None:
        """The request on this view is over: its slot stops holding up steps at once."""
        with self._cv:
            self._active.discard(view._batch_slot)
            self._cv.notify_all()

    def _load_prefix(self, view: Llama, tokens: list[int]) -> None:
        """Before `view` loads `tokens` as its prompt (Llama._prefix_source): keeps its own cached
        prefix, or, when another slot holds a longer prefix of them computed as prompt tokens,
        copies that prefix's KV cache into view's slot (a shared system prompt is computed once).
        Every slot's truncation happens here under one lock, so a prefix being copied is never
        being overwritten: a slot writes only past the tokens it lists."""
        with self._prefix_lock:
            limit = len(tokens) - 1  # a copied prefix leaves the last prompt token to evaluate
            own = view._reusable(tokens)
            best, src = own, None
            for other in self.views:
                n = min(_common_prefix(other._input_ids, tokens), other._prompt_run, limit)
                if other is not view and n > best:
                    best, src = n, other
            if src is None:
                view._truncate(own)
                return
            self._core.copy_prefix(src._batch_slot, view._batch_slot, best)
            view._input_ids = list(tokens[:best])
            view._prompt_run = best
            view._prompt_logits = None
            view._score_buf = view._scores = np.zeros((0, view.n_vocab()), dtype=np.float32)
            self.prefix_copies += 1

    def create_completions(self, prompts: Sequence[str | Sequence[int]], **kwargs: Any) -> list[dict[str, Any]]:
        """`Llama.create_completion(prompt, **kwargs)` of every prompt, n_parallel at a time, in order."""
        if kwargs.get("stream"):
            raise ValueError("create_completions returns whole results: stream=False")
        return self._map(lambda view, p: view.create_completion(p, **kwargs), prompts)

    def create_chat_completions(self, conversations: Sequence[Sequence[dict[str, Any]]],
                                **kwargs: Any) -> list[dict[str, Any]]:
        """`Llama.create_chat_completion(messages, **kwargs)` of every conversation, in order."""
        if kwargs.get("stream"):
            raise ValueError("create_chat_completions returns whole results: stream=False")
        return self._map(lambda view, m: view.create_chat_completion(m, **kwargs), conversations)

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        free = list(self.views)
        lock = threading.Lock()

        def one(item: Any) -> Any:
            with lock:
                view = free.pop()
            self.acquire(view)
            try:
                return fn(view, item)
            finally:
                self.release(view)
                with lock:
                    free.append(view)
        with ThreadPoolExecutor(self.n_parallel) as pool:
            return list(pool.map(one, items))

    def close(self) -> None:
        """Stops the scheduler; evals waiting get ValueError."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- the scheduler -----

    def _submit(self, job: _Job) -> np.ndarray:
        with self._cv:
            if self._closed:
                raise ValueError("this batch is closed")
            self._pending[job.slot] = job
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        if job.argmax:
            return job.rows[-1]
        return job.rows[0] if len(job.rows) == 1 else np.concatenate(job.rows)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._pending.values():
                        job.error = ValueError("this batch is closed")
                        job.done.set()
                    return
                # The running sequences submit their next token a moment after the last step:
                # wait for all of them (briefly), so that one step carries them all.
                deadline = time.monotonic() + GATHER_S
                while not self._active <= set(self._pending) and time.monotonic() < deadline:
                    self._cv.wait(deadline - time.monotonic())
                entries, jobs = self._plan()
            self._step(entries, jobs)

    def _plan(self) -> tuple[list[tuple[int, np.ndarray, bool, int]], list[tuple[_Job, int]]]:
        """The next step: every generated token waiting, then prompt chunks within the budget
        (prefill_chunk prompt tokens in all while some sequence decodes)."""
        budget = self.n_batch
        order = sorted(self._pending.values(), key=lambda j: not j.generated)
        prompt_budget = self.prefill_chunk if any(j.generated for j in order) else budget
        entries, jobs = [], []
        for job in order:
            left = len(job.tokens) - job.offset
            take = min(left, budget) if job.generated else min(left, budget, prompt_budget)
            if take <= 0:
                continue
            budget -= take
            if not job.generated:
                prompt_budget -= take
            final = job.offset + take == len(job.tokens)
            entries.append((job.slot, job.tokens[job.offset:job.offset + take], job.generated,
                            2 if job.logits_all else (3 if job.argmax else 1) if final else 0))
            jobs.append((job, take))
        return entries, jobs

    def _step(self, entries: list, jobs: list) -> None:
        ids = np.empty(sum(e[3] == 3 for e in entries), dtype=np.int32)
        try:
            logits = self._core.step(entries, ids)
            err = None
        except Exception as e:  # noqa: BLE001 - handed to the waiting views
            logits, err = None, e
        self.steps += 1
        row = n_id = 0
        with self._cv:
            for (job, take), entry in zip(jobs, entries):
                if err is not None:
                    job.error = err
                elif entry[3] == 3:
                    job.rows.append(int(ids[n_id]))
                    n_id += 1
                else:
                    n_rows = take if entry[3] == 2 else entry[3]
                    if n_rows:
                        job.rows.append(logits[row:row + n_rows])
                    row += n_rows
                if err is None:
                    job.offset += take
                if err is not None or job.offset == len(job.tokens):
                    del self._pending[job.slot]
                    job.done.set()
