"""The GPU the Metal backend runs on (cpp/metal/backend.h), made of the CPU harness: buffers are
numpy arrays (the weights: the mapped file itself), launches run on the fiber executor."""
from __future__ import annotations

import ctypes

import numpy as np

from upg_backend import _core


def aligned_zeros(nbytes: int) -> np.ndarray:
    """Zeroed bytes at a 64-byte aligned address, as GPU buffers are."""
    raw = np.zeros(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes]


class HarnessGpu(_core.MetalGpu):
    """`_core.MetalGpu` over the harness library (`harness.build()`); counts its launches."""

    def __init__(self, lib):
        super().__init__()
        self.lib, self.buffers, self.launches = lib, [], 0

    def _add(self, array: np.ndarray):
        self.buffers.append(array)
        return _core.Buf(len(self.buffers) - 1)

    def wrap(self, address: int, nbytes: int):
        assert address % 16384 == 0 and nbytes % 16384 == 0  # what newBufferWithBytesNoCopy needs
        return self._add(np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address)))

    def alloc(self, nbytes: int):
        return self._add(aligned_zeros(nbytes))

    def contents(self, buf) -> int:
        return self.buffers[buf.id].ctypes.data + buf.offset

    def begin(self):
        pass

    def end(self):
        pass

    def dispatch(self, launch: dict):
        bound = {i: None if buf < 0 else self.buffers[buf][off:] for i, buf, off in launch["buffers"]}
        args = launch["args"]
        if launch["args_index"] >= 0:
            bound[launch["args_index"]] = (ctypes.c_ubyte * len(args)).from_buffer_copy(args)
        self.lib.launch(launch["kernel"], bound, launch["groups"], (launch["threads"],), launch["tgmem"])
        self.launches += 1
