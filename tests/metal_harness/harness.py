"""Runs the Metal kernels of metal/ on the CPU (DESIGN.md, "Metal without a Mac").

The .metal sources are linted for C++ that Metal rejects, preprocessed as C++ through
metal/compat/ (which emulates the MSL subset the kernels use), stripped of their ``[[...]]``
attributes, and compiled with a generated launcher per kernel into one shared library, cached by
the hash of everything that goes into it. ``Library.launch`` runs a kernel on the fiber executor
of runtime.cpp: every GPU thread a fiber, barriers and ``simd_*`` calls counted.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
METAL = ROOT / "metal"
COMMON = ROOT / "cpp" / "upg" / "upg_common.h"  # the types and argument structs every backend shares
COMPAT = METAL / "compat"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = [
    "-std=c++17", "-O2", "-fPIC", "-fno-exceptions", "-fno-rtti", "-fno-strict-aliasing",
    "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
]
KERNEL_MARK = "__upg_kernel__"      # what `kernel` expands to while translating
THREADGROUP_MARK = "__upg_threadgroup__"  # and `threadgroup`, so [[threadgroup(i)]] survives

# MSL built-in index attributes the executor provides (fields of UpgBuiltins in runtime.h).
BUILTINS = {
    "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
    "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
    "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
    "threads_per_simdgroup", "simdgroups_per_threadgroup",
}


def metal_sources() -> list[Path]:
    """The kernel sources compiled into the Metal library."""
    return sorted(METAL.glob("*.metal"))


def harness_sources() -> list[Path]:
    """What the harness compiles: the kernel sources and its own self-test kernels."""
    return metal_sources() + [HERE / "selftest.metal"]


def kernel_headers() -> list[Path]:
    """The headers the kernel sources include (not the compat header)."""
    return sorted(METAL.glob("*.h")) + [COMMON]


# ---- lint: C++ that compiles with g++ but not with the Metal compiler ----

_LINT_RULES = [
    (r"\bstd::", "the C++ standard library"),
    (r"\bnew\b|\bdelete\b", "new/delete"),
    (r"\bvirtual\b", "virtual functions"),
    (r"\btry\b|\bcatch\b|\bthrow\b", "exceptions"),
    (r"\bgoto\b", "goto"),
    (r"\bthread_local\b", "thread_local"),
    (r"\bdouble\b", "double (Metal has no 64-bit float)"),
    (r"\bdynamic_cast\b|\btypeid\b", "RTTI"),
    (r"#\s*include\s*(?!<metal_stdlib>|\"upg_\w+\.h\")\S+", "an include other than <metal_stdlib> "
     "or a metal/upg_*.h header"),
    (r"\bthreadgroup\s+[\w:<>, ]+?\s+\w+\s*\[", "a threadgroup array declared in a function "
     "(the harness supports threadgroup memory only as [[threadgroup(i)]] parameters)"),
]
_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "do", "else"}


def _blank_comments_and_strings(text: str) -> str:
    """Replaces comments and string/char literals by spaces, keeping every newline."""
    def blank(m: re.Match) -> str:
        s = m.group(0)
        if s.startswith(("//", "/*")):
            return re.sub(r"[^\n]", " ", s)
        return s[0] + " " * (len(s) - 2) + s[-1]
    # Quoted include names are kept: the include rule reads them.
    pattern = r"//[^\n]*|/\*.*?\*/|(?<!include )\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'"
    return re.sub(pattern, blank, text, flags=re.S)


def _functions(text: str) -> dict[str, str]:
    """Function name -> body, for the functions defined in text (outside macros)."""
    funcs = {}
    for m in re.finditer(r"\b(\w+)\s*(?:<[^;{}()]*>)?\s*\([^;{}]*\)\s*(?:const\s*)?\{", text):
        name = m.group(1)
        if name in _KEYWORDS:
            continue
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        funcs.setdefault(name, "")
        funcs[name] += text[m.end():i]
    return funcs


def _recursion(funcs: dict[str, str]) -> list[str]:
    """Names of functions that can reach themselves through calls among funcs."""
    calls = {f: {g for g in funcs if re.search(rf"\b{g}\s*(?:<[^;{{}}()]*>)?\s*\(", body)}
             for f, body in funcs.items()}
    cyclic = []
    for start in funcs:
        seen, stack = set(), list(calls[start])
        while stack:
            f = stack.pop()
            if f == start:
                cyclic.append(start)
                break
            if f not in seen:
                seen.add(f)
                stack.extend(calls[f])
    return cyclic


def lint(paths: list[Path]) -> list[str]:
    """Problems (file:line: what) in sources that use what Metal lacks.

    Checks the standard library, new/delete, virtual, exceptions, goto, thread_local, double,
    RTTI, lambdas, foreign includes, function-local threadgroup arrays and recursion among the
    functions defined in the given files.
    """
    problems, all_funcs = [], {}
    for path in paths:
        text = _blank_comments_and_strings(path.read_text())
        def where(pos: int) -> str:
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            return f"{shown}:{text.count(chr(10), 0, pos) + 1}"
        for pattern, what in _LINT_RULES:
            for m in re.finditer(pattern, text):
                problems.append(f"{where(m.start())}: uses {what}")
        # A '[' that does not follow an operand (name, ']' or ')') and is not an attribute's
        # '[[' opens a lambda's capture list.
        for m in re.finditer(r"\[", text):
            i = m.start()
            if text.startswith("[[", i) or (i > 0 and text[i - 1] == "["):
                continue
            prev = text[:i].rstrip()[-1:]
            if not (prev.isalnum() or prev in "_])"):
                problems.append(f"{where(i)}: uses a lambda")
        for name, body in _functions(text).items():
            all_funcs[name] = all_funcs.get(name, "") + body
    problems += [f"{name}: recursion" for name in _recursion(all_funcs)]
    return problems


# ---- parsing the kernels out of the preprocessed source ----

@dataclasses.dataclass
class Param:
    type: str   # the C++ type after macro expansion (address spaces gone)
    name: str
    attr: str   # "buffer", "threadgroup" or a built-in name
    index: int  # buffer / threadgroup index, -1 for built-ins


@dataclasses.dataclass
class Kernel:
    name: str
    params: list[Param]

    def buffers(self) -> list[int]:
        return [p.index for p in self.params if p.attr == "buffer"]

    def n_threadgroup(self) -> int:
        return sum(p.attr == "threadgroup" for p in self.params)


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += {"(": 1, "<": 1, "[": 1, ")": -1, ">": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur.strip() else parts


def parse_kernels(expanded: str) -> list[Kernel]:
    """The kernels of a preprocessed source (kernel marked by KERNEL_MARK), with their parameters."""
    kernels = []
    for m in re.finditer(rf"\b{KERNEL_MARK}\s+void\s+(\w+)\s*\(", expanded):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(expanded[i], 0)
            i += 1
        params = []
        for raw in _split_top_level(expanded[m.end():i - 1]):
            pm = re.fullmatch(r"\s*(.*?)\s*\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]\s*", raw, re.S)
            if not pm:
                raise ValueError(f"kernel {m.group(1)}: parameter without an attribute: {raw.strip()}")
            decl, attr, index = pm.group(1).replace(THREADGROUP_MARK, ""), pm.group(2), pm.group(3)
            attr = "threadgroup" if attr == THREADGROUP_MARK else attr
            name = re.search(r"(\w+)$", decl).group(1)
            if attr not in ("buffer", "threadgroup") and attr not in BUILTINS:
                raise ValueError(f"kernel {m.group(1)}: attribute [[{attr}]] is not supported")
            params.append(Param(" ".join(decl[: -len(name)].split()), name, attr,
                                int(index) if index is not None else -1))
        kernels.append(Kernel(m.group(1), params))
    return kernels


def strip_attributes(text: str) -> str:
    """Removes every [[...]] attribute (g++ cannot parse MSL's once address spaces are macros)."""
    return re.sub(r"\[\[.*?\]\]", "", text, flags=re.S)


def launcher_code(k: Kernel) -> str:
    """C++ that calls kernel k for one thread and exports upg_launch_<name>."""
    args = []
    for p in k.params:
        if p.attr == "buffer":
            args.append(f"upg_arg<{p.type}>::get(bufs[{p.index}])")
        elif p.attr == "threadgroup":
            args.append(f"static_cast<{p.type}>(tgmem[{p.index}])")
        else:
            args.append(f"upg_builtin<{p.type}>::get(b->{p.attr})")
    return (
        f"static void upg_entry_{k.name}(void* const* bufs, void* const* tgmem, "
        f"const UpgBuiltins* b) {{\n  {k.name}({', '.join(args)});\n}}\n"
        f'extern "C" int upg_launch_{k.name}(void* const* bufs, const unsigned* groups, '
        f"const unsigned* tg, const uint64_t* tgmem_bytes, unsigned n_tgmem, char* err, "
        f"int errlen) {{\n  return upg_rt_launch(upg_entry_{k.name}, bufs, groups, tg, "
        f"tgmem_bytes, n_tgmem, err, errlen);\n}}\n"
    )


# ---- building ----

def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr}")
    return r.stdout


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "upg_metal_harness"


def _inputs_hash() -> str:
    h = hashlib.sha256()
    files = harness_sources() + kernel_headers() + sorted(COMPAT.iterdir()) + [
        HERE / "runtime.cpp", HERE / "runtime.h", HERE / "launch.h", Path(__file__)]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(" ".join([CXX, *CXXFLAGS]).encode() + _run([CXX, "--version"]).encode())
    return h.hexdigest()[:20]


def _translate(src: Path, workdir: Path) -> tuple[Path, list[Kernel]]:
    """Writes the compilable C++ for one .metal file; returns it and its kernels.

    The kernels' parameters are read from the preprocessed source (kernels may be defined by
    macros); what gets compiled is the original source without its attributes.
    """
    expanded = _run([CXX, "-E", "-x", "c++", "-std=c++17", f"-DUPG_KERNEL={KERNEL_MARK}",
                     f"-DUPG_THREADGROUP={THREADGROUP_MARK}", f"-I{COMPAT}", f"-I{METAL}", f"-I{COMMON.parent}",
                     str(src)])
    kernels = parse_kernels(expanded)
    out = workdir / (src.stem + ".cpp")
    out.write_text(f'#line 1 "{src}"\n' + strip_attributes(src.read_text()) +
                   '\n#include "launch.h"\n' + "".join(launcher_code(k) for k in kernels))
    return out, kernels


def build() -> "Library":
    """Lints, translates and compiles metal/*.metal into the cached harness library."""
    problems = lint(harness_sources() + kernel_headers())
    if problems:
        raise ValueError("Metal sources use C++ that Metal lacks:\n" + "\n".join(problems))
    target = _cache_root() / _inputs_hash()
    lib, meta = target / "libupg_metal_cpu.so", target / "kernels.json"
    if not (lib.exists() and meta.exists()):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            work = Path(tmp)
            kernels, units = [], []
            for src in harness_sources():
                unit, ks = _translate(src, work)
                units.append(unit)
                kernels += ks
            units.append(HERE / "runtime.cpp")
            objs = [work / f"{i}.o" for i in range(len(units))]
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda uo: _run([CXX, *CXXFLAGS, f"-I{HERE}", f"-I{COMPAT}",
                                                f"-I{METAL}", f"-I{COMMON.parent}", "-c", str(uo[0]), "-o", str(uo[1])]),
                              zip(units, objs)))
            _run([CXX, "-shared", "-o", str(work / lib.name), *map(str, objs), "-lm"])
            (work / meta.name).write_text(json.dumps([dataclasses.asdict(k) for k in kernels]))
            if not target.exists():  # another session may have built it meanwhile
                work.rename(target)
    kernels = [Kernel(k["name"], [Param(**p) for p in k["params"]])
               for k in json.loads(meta.read_text())]
    return Library(lib, kernels)


# ---- constants and argument structs of cpp/upg/upg_common.h ----

def constants() -> dict[str, int]:
    """The integer #defines of cpp/upg/upg_common.h (UPG_*)."""
    text = COMMON.read_text()
    return {k: int(v) for k, v in re.findall(r"#define\s+(UPG_\w+)\s+(\d+)\b", text)}


_CTYPES = {"int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "float": ctypes.c_float}


def arg_structs() -> dict[str, type]:
    """The Upg*Args structs of cpp/upg/upg_common.h as ctypes.Structure classes, by name."""
    text = _blank_comments_and_strings(COMMON.read_text())
    structs = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\};", text, re.S):
        fields = [(name, _CTYPES[t]) for t, name in re.findall(r"(\w+)\s+(\w+)\s*;", m.group(2))]
        structs[m.group(1)] = type(m.group(1), (ctypes.Structure,), {"_fields_": fields})
    return structs


class Library:
    """The compiled kernels; launch() runs one on the fiber executor."""

    def __init__(self, path: Path, kernels: list[Kernel]):
        self._lib = ctypes.CDLL(str(path))
        self.kernels = {k.name: k for k in kernels}

    def launch(self, name: str, buffers: dict, groups, threads, tgmem_bytes=()) -> None:
        """Runs kernel `name` like dispatchThreadgroups:threadsPerThreadgroup:.

        Args:
            name: the kernel function name.
            buffers: buffer index -> a C-contiguous numpy array, a ctypes struct or byte array
                (a `constant` argument) or None (a buffer the kernel must not touch). Every
                buffer the kernel declares must be given.
            groups: threadgroups per grid, up to 3 numbers.
            threads: threads per threadgroup, up to 3 numbers.
            tgmem_bytes: sizes of threadgroup memory 0, 1, ... in bytes.

        Raises:
            ValueError: a bad binding, or the launch failed (deadlock, divergence, ...).
        """
        k = self.kernels.get(name)
        if k is None:
            raise ValueError(f"no kernel {name!r}")
        missing = sorted(set(k.buffers()) - set(buffers))
        if missing:
            raise ValueError(f"{name}: buffers {missing} not bound")
        if len(tgmem_bytes) != k.n_threadgroup():
            raise ValueError(f"{name}: needs {k.n_threadgroup()} threadgroup memory sizes")
        ptrs = (ctypes.c_void_p * (max(buffers, default=0) + 1))()
        for i, b in buffers.items():
            if isinstance(b, np.ndarray):
                if not b.flags.c_contiguous:
                    raise ValueError(f"{name}: buffer {i} is not C-contiguous")
                ptrs[i] = b.ctypes.data
            elif isinstance(b, (ctypes.Structure, ctypes.Array)):
                ptrs[i] = ctypes.addressof(b)
            elif b is not None:
                raise ValueError(f"{name}: buffer {i} has unsupported type {type(b).__name__}")
        def dims(v):
            return (ctypes.c_uint * 3)(*(list(v) + [1, 1, 1])[:3])
        sizes = (ctypes.c_uint64 * max(1, len(tgmem_bytes)))(*tgmem_bytes)
        err = ctypes.create_string_buffer(512)
        fn = getattr(self._lib, f"upg_launch_{name}")
        if fn(ptrs, dims(groups), dims(threads), sizes, len(tgmem_bytes), err, len(err)) != 0:
            raise ValueError(f"{name}: {err.value.decode()}")
