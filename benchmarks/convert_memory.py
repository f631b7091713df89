"""Peak memory of converting a Phi-4-shaped Hugging Face checkpoint (not a test).

Writes a checkpoint with Phi-4's exact shapes (bf16 safetensors in shards, random values: memory
does not depend on them), then runs `upg convert` in a child process and reports its peak resident
set (VmHWM) against the issue's bound: 4 GB plus the largest tensor (as f32, the converter's
working type). The child's /proc status is sampled every 0.2 s for the peaks of its anonymous
memory (RssAnon) and of the mapped files it has resident (RssFile: the model the calibration runs
is mapped, and its pages are page cache the kernel takes back under pressure).

    python3 benchmarks/convert_memory.py --work WORK_DIR --type q4
    python3 benchmarks/convert_memory.py --work WORK_DIR --bpw 4.25 --calibration-tokens 1024
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from upg_backend.bench import SHAPES
from upg_backend.config import ModelConfig

SHARD_BYTES = 5 * 2**30


def hf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Phi3ForCausalLM's checkpoint tensors (fused projections, as Phi-4 ships them)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.qkv_proj.weight", (cfg.qkv_rows, h)),
                (p + "self_attn.o_proj.weight", (h, cfg.num_attention_heads * hd)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_up_proj.weight", (2 * cfg.intermediate_size, h)),
                (p + "mlp.down_proj.weight", (h, cfg.intermediate_size))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]


def write_checkpoint(out: Path, phi4_dir: Path) -> None:
    """bf16 shards written tensor by tensor (safetensors layout: u64 header size, JSON, data)."""
    hf = dict(SHAPES["phi-4"], torch_dtype="bfloat16", model_type="phi3")
    cfg = ModelConfig.from_hf(hf)
    out.mkdir(parents=True, exist_ok=True)
    tile = (np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32)
    tile = (tile >> 16).astype(np.uint16).tobytes()  # bf16 bits
    shards, current, size = [], [], 0
    for name, shape in hf_tensors(cfg):
        n = int(np.prod(shape)) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, n))
        size += n
    shards.append(current)
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, n in tensors:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for _, _, n in tensors:
                for start in range(0, n, len(tile)):
                    f.write(tile[: min(len(tile), n - start)])
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(phi4_dir / f, out / f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint and the output (about 40 GB)")
    ap.add_argument("--type", default="q4")
    ap.add_argument("--bpw", type=float, default=None, help="convert with --bpw X (calibrates; replaces --type)")
    ap.add_argument("--calibration", action="store_true", help="calibrate with the shipped text (--type stays)")
    ap.add_argument("--calibration-tokens", type=int, default=None, help="passed to upg convert")
    ap.add_argument("--phi4-dir", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data" / "phi-4",
                    help="Phi-4's config and tokenizer files (default: the copy in tests/data)")
    args = ap.parse_args()
    what = f"bpw{args.bpw:g}" if args.bpw else args.type + ("-calibrated" if args.calibration else "")
    src, out = args.work / "phi-4-hf", args.work / f"phi-4-{what}.upg"
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        write_checkpoint(src, args.phi4_dir)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s")
    cfg = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    largest = max(int(np.prod(s)) for _, s in hf_tensors(cfg)) * 4
    argv = [sys.executable, "-m", "upg_backend.cli", "convert", str(src), "-o", str(out)]
    argv += ["--bpw", str(args.bpw)] if args.bpw else ["--type", args.type]
    argv += ["--calibration"] if args.calibration else []
    argv += ["--calibration-tokens", str(args.calibration_tokens)] if args.calibration_tokens else []
    t = time.perf_counter()
    log = out.with_suffix(".log")  # the progress bars: how long each step took
    child = subprocess.Popen(argv, stderr=log.open("w"))
    peaks = {"RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - t
    if child.returncode:
        print(log.read_text()[-4000:])
        return 1
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    bound = 4e9 + largest
    print(f"converted ({' '.join(argv[6:])}) in {seconds:.0f} s; output {out.stat().st_size / 1e9:.2f} GB; "
          f"progress in {log}")
    print(f"peak RSS {peak / 1e9:.2f} GB (anonymous {peaks['RssAnon'] / 1e9:.2f} GB, mapped files "
          f"{peaks['RssFile'] / 1e9:.2f} GB, sampled); bound 4 GB + largest tensor as f32 ({largest / 1e9:.2f} GB) = "
          f"{bound / 1e9:.2f} GB: {'within' if peak <= bound else 'OVER'}")
    return 0 if peak <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
