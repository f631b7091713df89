"""The GPU tests run only on a machine with a CUDA GPU, when UPG_GPU_TESTS=1 (docs/CUDA.md); the
default `pytest` run does not collect them."""
import os

collect_ignore_glob = [] if os.environ.get("UPG_GPU_TESTS") == "1" else ["test_*.py"]
