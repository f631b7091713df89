"""The server on a CUDA Batch (GPU only: UPG_GPU_TESTS=1): tests/test_server_batch.py's join-and-
leave case on the GPU. Requests arrive one after another into a running batch of 4 slots (their
prompts chunked beside the others' generated tokens, a shared system prompt copied between slots);
each answer must be the one a Llama alone on the GPU gives, greedy and seeded sampling alike."""
from __future__ import annotations

import concurrent.futures
import time

import openai

from chat_model import SERVER_N_CTX, model_path  # noqa: F401 (fixture)
from conftest import serve_app
from upg_backend.batch import Batch
from upg_backend.llama import Llama
from upg_backend.server import create_app


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}: how are you?"}]


def test_requests_join_and_leave_a_running_batch_on_the_gpu(model_path):
    alone = Llama(model_path, n_ctx=SERVER_N_CTX, backend="cuda")
    jobs = [(i, 6 + 5 * (i % 4), 0.0 if i % 2 else 0.9) for i in range(10)]
    want = {i: alone.create_chat_completion(messages(i), max_tokens=n, temperature=t, seed=i)
            ["choices"][0]["message"]["content"] for i, n, t in jobs}
    llama = Llama(model_path, n_ctx=SERVER_N_CTX, backend="cuda")
    batch = Batch(llama, 4)
    assert batch._core.backend == "cuda"
    srv, thread, url = serve_app(create_app(llama, model_name="tiny", batch=batch))
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def run(job):
            i, n, t = job
            time.sleep(0.03 * i)  # arrive one after another, into a batch already running
            r = c.chat.completions.create(model="tiny", messages=messages(i), max_tokens=n, temperature=t, seed=i)
            return i, r.choices[0].message.content
        steps0 = batch.steps
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            got = dict(pool.map(run, jobs))
        assert got == want
        assert batch.steps - steps0 < sum(n + 1 for _, n, _ in jobs)  # evaluated together
        assert batch.prefix_copies > 0
    finally:
        srv.should_exit = True
        thread.join(10)
        batch.close()
