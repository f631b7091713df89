"""llama.cpp's side of testbed_quality.py: the logits of token windows through llama-cpp-python.

    $PEER_VENV/bin/python benchmarks/peer_logits.py MODEL.gguf WINDOWS.npy FIRST N_THREADS

WINDOWS.npy holds int32 [n_windows, n_ctx] token ids. For each window, from an empty context, the
float32 logits of positions FIRST..n_ctx-1 ([n_ctx - FIRST, n_vocab]) go to stdout as raw bytes, one
window after another, so that testbed_quality.py scores them as they come (nothing is kept here).
"""
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    model, windows_path, first, n_threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    windows = np.load(windows_path)
    n_ctx = windows.shape[1]
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    out = sys.stdout.buffer
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        out.write(np.ascontiguousarray(llm.scores[first:n_ctx], dtype=np.float32).tobytes())
        out.flush()


if __name__ == "__main__":
    main()
