"""The server on a CUDA Batch (GPU only: UPG_GPU_TESTS=1): tests/test_server_batch.py's join-and-
leave case on the GPU. Requests arrive one after another into a running batch of 4 slots (their
prompts chunked beside the others' generated tokens, a shared system prompt copied between slots);
each answer must be the one a Llama alone on the GPU gives, greedy and seeded sampling alike (the
Llama alone samples through Session.eval_sample, the server's views on the host from whole rows)."""
from __future__ import annotations

from chat_model import SERVER_N_CTX, join_and_leave, model_path  # noqa: F401 (fixture)
from conftest import serve_app
from upg_backend.batch import Batch
from upg_backend.llama import Llama
from upg_backend.server import create_app


def test_requests_join_and_leave_a_running_batch_on_the_gpu(model_path):
    alone = Llama(model_path, n_ctx=SERVER_N_CTX, backend="cuda")
    llama = Llama(model_path, n_ctx=SERVER_N_CTX, backend="cuda")
    batch = Batch(llama, 4)
    assert batch._core.backend == "cuda"
    srv, thread, url = serve_app(create_app(llama, model_name="tiny", batch=batch))
    try:
        join_and_leave(url, batch, alone)
    finally:
        srv.should_exit = True
        thread.join(10)
        batch.close()
