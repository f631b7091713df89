"""ctypes binding of tests/gpu/capi.cu for the GPU tests and benchmarks/cuda_ops.py.

The library is $UPG_CUDA_LIB when set, else it is built with nvcc (for this GPU's architecture)
into a cache folder on first use. Tensors are torch CUDA tensors; every call launches on torch's
current stream, so the launches can be captured with torch.cuda.graph.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4": 4, "q3": 5, "i32": 6, "iq4_nl": 7, "iq4_xs": 8, "iq3": 9}
_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float

_SIGNATURES = {
    "upg_cuda_init": [_I],
    "upg_set_programmatic_launch": [_I],
    "upg_matvec": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _F, _I, _I, _P],
    "upg_matmul": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P],
    "upg_get_rows": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P],
    "upg_rms_norm": [_P, _P, _P, _I, _F, _I, _I, _P, _P],
    "upg_rope": [_P, _P, _I, _I, _I, _I, _I, _F, _P, _P],
    "upg_kv_store": [_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _P, _P],
    "upg_matvec_n": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P],
    "upg_attention_decode": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _F, _P, _P, _P],
    "upg_attention_prefill": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _F, _P, _P],
    "upg_silu_mul": [_P, _P, _I, _I, _I, _P, _P],
    "upg_add": [_P, _P, _I, _I, _P, _P],
    "upg_argmax": [_P, _I, _P, _P],
    "upg_next_token": [_P, _P, _P, _P],
}


def _sources():
    """The kernel layer (not CudaBackend, which needs the engine), the C ABI, and the headers they read."""
    kernels = [p for p in sorted((ROOT / "cpp" / "cuda").glob("*.cu*")) if p.name != "backend.cu"]
    return kernels + [ROOT / "tests" / "gpu" / "capi.cu", ROOT / "cpp" / "upg" / "upg_common.h",
                      ROOT / "cpp" / "upg" / "quant.h"]


def build(out: Path) -> Path:
    """Compiles the kernels and capi.cu into the shared library `out` for the current GPU (as run_all.sh)."""
    major, minor = torch.cuda.get_device_capability()
    cmd = ["nvcc", "-std=c++17", "-O3", f"-arch=sm_{major}{minor}", "-shared", "-Xcompiler", "-fPIC",
           f"-I{ROOT / 'cpp' / 'cuda'}", f"-I{ROOT / 'cpp'}", "-o", str(out)]
    cmd += [str(p) for p in _sources() if p.suffix == ".cu"]
    subprocess.run(cmd, check=True)
    return out


def _library_path() -> Path:
    if os.environ.get("UPG_CUDA_LIB"):
        return Path(os.environ["UPG_CUDA_LIB"])
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources())).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"upg_cuda_test_{digest}.so"
    return path if path.exists() else build(path)


class Lib:
    """The launchers with tensor arguments; raises RuntimeError with the launcher's message."""

    def __init__(self):
        self._lib = ctypes.CDLL(str(_library_path()))
        for name, args in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self._lib.upg_cuda_last_error.restype = ctypes.c_char_p
        self._lib.upg_decode_workspace.argtypes = [_I, _I, _I, _I, _I, _I]
        self._lib.upg_matvec_tokens.argtypes = [_I, _I, _I, _I]
        self._lib.upg_matvec_tokens.restype = ctypes.c_int
        self._lib.upg_decode_workspace.restype = ctypes.c_size_t
        self._lib.upg_matmul_scratch.argtypes = [_I, _I, _I, _I, _I]
        self._lib.upg_matmul_scratch.restype = ctypes.c_size_t
        self._scratch = {}  # matmul scratch by size, kept so that captured graphs can replay
        self._call("upg_cuda_init", torch.cuda.current_device())

    def _call(self, name, *args):
        conv = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        if getattr(self._lib, name)(*conv) != 0:
            raise RuntimeError(self._lib.upg_cuda_last_error().decode())

    def set_programmatic_launch(self, on):
        """Programmatic dependent launch on or off for the launches that follow (default: on, sm_90+)."""
        self._call("upg_set_programmatic_launch", int(on))

    @staticmethod
    def _stream():
        return torch.cuda.current_stream().cuda_stream

    def matvec(self, w, x, y, norm_weight=None, eps=0.0, silu=False, accumulate=False):
        """w: Weight (below); x, y f32 tensors."""
        self._call("upg_matvec", DTYPES[w.dtype], w.rows, w.cols, w.block, w.data, *w.outliers, x, y,
                   norm_weight, eps, int(silu), int(accumulate), self._stream())

    def matvec_n(self, w, x, y, n):
        """n tokens: x [n, cols], y [n, rows] f32 tensors."""
        self._call("upg_matvec_n", DTYPES[w.dtype], w.rows, w.cols, w.block, w.data, *w.outliers, x, y, n,
                   self._stream())

    def matvec_tokens(self, w):
        """Tokens one matvec_n launch takes for w."""
        return self._lib.upg_matvec_tokens(DTYPES[w.dtype], w.rows, w.cols, w.block)

    def matmul(self, w, x, y, capacity, ldy, pass_):
        n = self._lib.upg_matmul_scratch(DTYPES[w.dtype], w.rows, w.cols, w.block, capacity)
        if n and n not in self._scratch:
            self._scratch[n] = torch.empty(n, dtype=torch.uint8, device="cuda")
        self._call("upg_matmul", DTYPES[w.dtype], w.rows, w.cols, w.block, w.data, *w.outliers, x, y, capacity,
                   ldy, pass_, self._scratch[n] if n else None, self._stream())

    def get_rows(self, w, ids, out, capacity, pass_):
        self._call("upg_get_rows", DTYPES[w.dtype], w.rows, w.cols, w.block, w.data, *w.outliers, ids, out,
                   capacity, pass_, self._stream())

    def rms_norm(self, x, w, out, n, eps, capacity, last_only, pass_):
        self._call("upg_rms_norm", x, w, out, n, eps, capacity, int(last_only), pass_, self._stream())

    def rope(self, qkv, inv_freq, capacity, n_heads, head_dim, rot_dims, token_stride, attn_factor, pass_):
        self._call("upg_rope", qkv, inv_freq, capacity, n_heads, head_dim, rot_dims, token_stride,
                   attn_factor, pass_, self._stream())

    def kv_store(self, qkv, kc, vc, nh, nkv, hd, kv_stride, q_stride, capacity, pass_):
        self._call("upg_kv_store", qkv, kc, vc, int(kc.dtype == torch.float16), nh, nkv, hd, kv_stride, q_stride,
                   capacity, pass_, self._stream())

    def decode_workspace(self, nh, nkv, hd, kv_stride, slot_len=0, n_decode=1):
        """A scratch tensor of the size attention_decode needs (slot_len 0: kv_stride)."""
        n = self._lib.upg_decode_workspace(nh, nkv, hd, kv_stride, slot_len, n_decode)
        return torch.zeros((n + 3) // 4, dtype=torch.float32, device="cuda")

    def attention_decode(self, qkv, kc, vc, out, nh, nkv, hd, kv_stride, q_stride, scale, ws, pass_, n_decode=1,
                         slot_len=0):
        """The pass's first n_decode tokens, generated ones."""
        self._call("upg_attention_decode", qkv, kc, vc, out, int(kc.dtype == torch.float16), nh, nkv, hd,
                   kv_stride, slot_len, q_stride, n_decode, scale, ws, pass_, self._stream())

    def attention_prefill(self, qkv, kc, vc, out, nh, nkv, hd, kv_stride, q_stride, capacity, scale, pass_, n_decode=0,
                          n_seqs=1, slot_len=0):
        """The pass's prompt tokens (those after its n_decode generated ones) of n_seqs sequences."""
        self._call("upg_attention_prefill", qkv, kc, vc, out, int(kc.dtype == torch.float16), nh, nkv, hd,
                   kv_stride, slot_len, q_stride, capacity, n_decode, n_seqs, scale, pass_, self._stream())

    def silu_mul(self, gu, out, n, capacity, in_stride, pass_):
        self._call("upg_silu_mul", gu, out, n, capacity, in_stride, pass_, self._stream())

    def add(self, x, y, n, capacity, pass_):
        self._call("upg_add", x, y, n, capacity, pass_, self._stream())

    def argmax(self, x, n, out):
        self._call("upg_argmax", x, n, out, self._stream())

    def next_token(self, pass_, token, out):
        self._call("upg_next_token", pass_, token, out, self._stream())


class Weight:
    """A matrix on the device in the file layout: `data` uint8 tensor, outliers (rowptr, col, val)
    as int32 / int32 / int16-bits tensors or Nones."""

    def __init__(self, dtype, rows, cols, block, data, outliers=None):
        self.dtype, self.rows, self.cols, self.block, self.data = dtype, rows, cols, block, data
        self.outliers = tuple(outliers) if outliers is not None else (None, None, None)


def pass_tensor(n_past, n_tokens, n_decode=0):
    """The per-pass buffer of one sequence in slot 0 (batch_pass)."""
    return batch_pass([(0, n_past, n_tokens)], n_decode, 1)


def batch_pass(seqs, n_decode, slot_len, rope_sets=None):
    """The per-pass buffer, int32 on the device, as Graph::pass_bytes lays it out (upg_common.h):
    UpgPass [n_past of the first sequence, n_tokens, n_seqs, n_decode], an UpgToken [pos, kv_base,
    rope_set, seq] per token, an UpgSeq [first, n_tokens, n_past, kv_base, rope_set, 0, 0, 0] per
    sequence. seqs: (slot, n_past, n_tokens) in the order of their tokens; kv_base = slot *
    slot_len; rope_sets: one per sequence (default 0)."""
    rope_sets = rope_sets or [0] * len(seqs)
    tokens, entries, first = [], [], 0
    for s, ((slot, n_past, n), rs) in enumerate(zip(seqs, rope_sets)):
        tokens += [v for i in range(n) for v in (n_past + i, slot * slot_len, rs, s)]
        entries += [first, n, n_past, slot * slot_len, rs, 0, 0, 0]
        first += n
    head = [seqs[0][1], first, len(seqs), n_decode]
    return torch.tensor(head + tokens + entries, dtype=torch.int32, device="cuda")
