"""Mutated .upg files: opening them (`_core.File`, `verify()`, `_core.Model`, a one-token eval)
either works or raises UPGFormatError; never another exception, never a crash. The opens run in
this process, so a crash fails the suite."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_hf_checkpoint
from upg_backend import _core
from upg_backend.convert import convert_hf
from upg_backend.format import UPGFile, UPGFormatError

EXTREMES = [0, 1, 2, 3, 63, 64, 65, 255, 256, 512, 513, 16383, 16384, 16385, 2**31 - 1, 2**31, 2**32 - 1,
            2**32, 2**48, 2**63 - 1, 2**63, 2**64 - 1]
TOKENS = np.array([1, 2], dtype=np.int32)
# preamble fields after the magic: (offset, struct format)
PREAMBLE_FIELDS = [(8, "<I"), (12, "<I")] + [(o, "<Q") for o in range(16, 64, 8)]


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    """A small valid model file with every structure the reader checks (quantized matrices, outlier
    companions, f32 norms), a tiny tokenizer so the mutations land mostly in the binary parts;
    plus its directory's field positions and the engine config."""
    root = tmp_path_factory.mktemp("fuzz")
    src = make_hf_checkpoint(root / "hf", "Phi3ForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    (src / "tokenizer.json").write_text("{}")
    path = root / "seed.upg"
    convert_hf(src, path, type="q4", outliers=0.05, progress=False)
    raw = path.read_bytes()
    return raw, _directory_fields(raw), UPGFile(path).config.engine_config(), root / "mutated.upg"


def _directory_fields(raw: bytes) -> list[tuple[int, str]]:
    """(byte position, struct format) of every field of every directory record."""
    pos = struct.unpack_from("<Q", raw, 32)[0]
    fields = [(pos, "<I")]
    pos += 4
    for _ in range(struct.unpack_from("<I", raw, pos - 4)[0]):
        name_len = struct.unpack_from("<H", raw, pos)[0]
        ndim = raw[pos + 2 + name_len + 1]
        fields.append((pos, "<H"))
        pos += 2 + name_len
        fields += [(pos, "<B"), (pos + 1, "<B"), (pos + 2, "<H")]
        pos += 4
        fields += [(pos + 8 * i, "<Q") for i in range(ndim + 2)] + [(pos + 8 * (ndim + 2), "<I")]
        pos += 8 * (ndim + 2) + 4
    return fields


def _set_field(data: bytearray, pos: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    struct.pack_into(fmt, data, pos, value & ((1 << (8 * size)) - 1))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**40), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**40)),
    st.tuples(st.just("insert"), st.integers(0, 2**40), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 2**40), st.integers(1, 20000)),
    st.tuples(st.just("preamble"), st.integers(0, len(PREAMBLE_FIELDS) - 1), st.sampled_from(EXTREMES), st.integers(-2, 2)),
    st.tuples(st.just("directory"), st.integers(0, 2**20), st.sampled_from(EXTREMES), st.integers(-2, 2)),
)


def _mutate(raw: bytes, fields, ops) -> bytes:
    data = bytearray(raw)
    for op in ops:
        kind = op[0]
        if kind == "flip" and data:
            data[op[1] % len(data)] ^= op[2]
        elif kind == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif kind == "insert":
            pos = op[1] % (len(data) + 1)
            data[pos:pos] = op[2]
        elif kind == "delete" and data:
            pos = op[1] % len(data)
            del data[pos:pos + op[2]]
        elif kind in ("preamble", "directory"):
            pos, fmt = PREAMBLE_FIELDS[op[1]] if kind == "preamble" else fields[op[1] % len(fields)]
            if pos + struct.calcsize(fmt) <= len(data):
                _set_field(data, pos, fmt, op[2] + op[3])
    return bytes(data)


def _open_everything(path, config) -> None:
    f = _core.File(str(path))
    f.verify()
    model = _core.Model(str(path), config)
    session = _core.Session(model, 8, "f32", 1)
    session.eval(TOKENS, False)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_file_only_raises_format_error(seed_file, ops):
    raw, fields, config, path = seed_file
    path.write_bytes(_mutate(raw, fields, ops))
    try:
        _open_everything(path, config)
    except UPGFormatError:
        pass


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(field=st.integers(0, 2**20), value=st.sampled_from(EXTREMES), delta=st.integers(-2, 2))
def test_directory_field_extremes_without_crc_check(seed_file, field, value, delta):
    """Fields set to extreme values with their crc32 left valid for the data: the structural checks
    alone must catch what would make the engine read out of bounds."""
    raw, fields, config, path = seed_file
    path.write_bytes(_mutate(raw, fields, [("directory", field, value, delta)]))
    try:
        model = _core.Model(str(path), config)
        _core.Session(model, 8, "f32", 1).eval(TOKENS, False)
    except UPGFormatError:
        pass


def test_seed_file_is_valid(seed_file):
    raw, fields, config, path = seed_file
    path.write_bytes(raw)
    _open_everything(path, config)
    assert json.loads(_core.File(str(path)).header)["architecture"] == "Phi3ForCausalLM"
    assert len(fields) > 9 * 8  # every record of the file was walked
