"""The `upg` command.

Each subcommand is one function registered with `@subcommand(name, help, arguments)`: `arguments`
adds its options to the subparser, the function gets the parsed namespace and returns the exit
status. Import heavy modules inside the function, so `upg --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable

from ._core import UPGFormatError
from .backends import GENERATED, NAMES


@dataclasses.dataclass(frozen=True)
class Subcommand:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Registers the decorated function as `upg NAME`."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        SUBCOMMANDS[name] = Subcommand(help, arguments, run)
        return run
    return register


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    from .recipes import RECIPES, WEIGHT_TYPES  # light: numpy only

    p.add_argument("src", help="a Hugging Face checkpoint directory (config.json, tokenizer.json, *.safetensors) or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="the .upg file to write")
    p.add_argument("--type", default="f16", choices=WEIGHT_TYPES + ("source",),
                   help="weight type of the matrices (default f16); GGUF only: 'source' keeps each matrix in the "
                        "UPG type that holds its GGUF type exactly (Q8_0, Q4_0, IQ4_NL, IQ4_XS), f16 where none does")
    p.add_argument("--block", type=int, default=32, choices=(32, 64), help="quantization block size (default 32)")
    p.add_argument("--outliers", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of each row of a quantized matrix kept exactly in f16 (default 0)")
    p.add_argument("--recipe", default=None, choices=tuple(RECIPES),
                   help="a named quantization recipe, mixed types per tensor (replaces --type/--block/--outliers)")
    p.add_argument("--calibration", nargs="?", const="", default=None, metavar="TEXT",
                   help="weight the quantizer by importance measured on TEXT (a UTF-8 file; without TEXT the "
                        "calibration text that ships with the package)")
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="calibrate on N tokens of the text, in windows spread over it (default 8192; 0: all)")
    p.add_argument("--importance", default=None, metavar="FILE",
                   help="use the importance saved by an earlier --save-importance instead of calibrating")
    p.add_argument("--save-importance", default=None, metavar="FILE", help="save the measured importance to FILE")
    p.add_argument("--bpw", type=float, default=None, metavar="X",
                   help="choose per-tensor types so that the transformer blocks' matrices average at most X bits "
                        "per weight, by measured sensitivity (calibrates with the shipped text unless "
                        "--calibration or --importance says otherwise); replaces --type and --recipe")
    p.add_argument("--gptq", action="store_true",
                   help="quantize the transformer blocks' matrices with GPTQ error feedback, from the Gram matrices "
                        "of their inputs measured on the calibration text (calibrates unless --calibration says "
                        "how; not with --importance); with --bpw, each candidate's noise is measured as GPTQ "
                        "writes it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _importance(args: argparse.Namespace):
    """The importance a calibrated conversion uses: loaded from --importance, or measured."""
    from . import calibrate

    if args.importance is not None:
        if args.calibration is not None or args.calibration_tokens is not None:
            raise ValueError("--importance excludes --calibration and --calibration-tokens: the file was measured already")
        if args.gptq:
            raise ValueError("--gptq needs the Gram matrices of a calibration run, which an importance file does not "
                             "hold: use --calibration instead of --importance")
        return calibrate.Importance.load(args.importance)
    if args.calibration and not os.path.isfile(args.calibration):
        raise FileNotFoundError(f"no such calibration text: {args.calibration}")
    tokens = calibrate.DEFAULT_TOKENS if args.calibration_tokens is None else args.calibration_tokens or None
    imp = calibrate.collect_source(args.src, args.calibration or None, max_tokens=tokens, gram=args.gptq,
                                   progress=not args.quiet, work_dir=os.path.dirname(os.path.abspath(args.output)))
    if args.save_importance:
        imp.save(args.save_importance)
    return imp


@subcommand("convert", "convert a Hugging Face checkpoint or a GGUF file to a .upg file", _convert_arguments)
def _convert(args: argparse.Namespace) -> int:
    if args.src.endswith(".gguf"):
        from .gguf_source import convert_gguf as convert
    elif args.type == "source":
        raise ValueError("--type source applies to GGUF files only")
    else:
        from .convert import convert_hf as convert

    calibrated = args.gptq or any(v is not None for v in (args.calibration, args.importance, args.bpw))
    if not calibrated and (args.save_importance or args.calibration_tokens is not None):
        raise ValueError("--save-importance and --calibration-tokens need --calibration or --bpw")
    if args.bpw is not None and args.recipe is not None:
        raise ValueError("--bpw chooses the types itself: pass either --bpw or --recipe")
    kw = {"importance": _importance(args), "bpw": args.bpw} if calibrated else {}
    convert(args.src, args.output, type=args.type, block=args.block, outliers=args.outliers, recipe=args.recipe,
            progress=not args.quiet, **kw)
    print(f"wrote {args.output}")
    return 0


def _file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .upg file")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@subcommand("inspect", "show a .upg file's model, tensors and provenance", _file_argument)
def _inspect(args: argparse.Namespace) -> int:
    from .format import iter_model_tensors, UPGFile

    upg = UPGFile(args.file)
    cfg = upg.config
    weights = sum(t.n_elements for t in iter_model_tensors(upg))
    tensor_bytes = sum(t.nbytes for t in upg.tensors.values())
    rope = cfg.rope_type + (f", partial {cfg.partial_rotary_factor:g}" if cfg.partial_rotary_factor != 1 else "")
    print(f"file          {upg.path} ({upg.file_size:,} bytes, {_size(upg.file_size)})")
    print(f"architecture  {upg.architecture}")
    print(f"config        hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads {cfg.num_attention_heads}"
          f" (kv {cfg.num_key_value_heads}, head_dim {cfg.head_dim}), mlp {cfg.intermediate_size},"
          f" vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}, rope {rope} theta {cfg.rope_theta:g},"
          f" tied embeddings {'yes' if cfg.tie_word_embeddings else 'no'}")
    print(f"quantization  {upg.header.get('quantization', {})}")
    print(f"weights       {weights:,} in {_size(tensor_bytes)}: {8 * tensor_bytes / max(weights, 1):.3f} bits per weight")
    print(f"templates     {', '.join(upg.header.get('chat_templates', {})) or '(none)'}")
    print("provenance    " + ", ".join(f"{k} {v}" for k, v in upg.header.get("provenance", {}).items()))
    width = max((len(n) for n in upg.tensors), default=4)
    print(f"\n{'tensor':<{width}}  {'type':<5} {'shape':<16} {'bytes':>12}")
    for t in upg.tensors.values():
        shape = "x".join(map(str, t.dims)) + (f" /{t.block}" if t.block else "")
        print(f"{t.name:<{width}}  {t.dtype:<5} {shape:<16} {t.nbytes:>12,}")
    return 0


@subcommand("verify", "check a .upg file: structure, every tensor's crc32, the model graph", _file_argument)
def _verify(args: argparse.Namespace) -> int:
    from .format import UPGFile

    UPGFile(args.file).verify()
    print("OK")
    return 0


def _backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=NAMES,
                   help="what computes: auto (the fastest this build and machine run), cpu, metal, cuda")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="a .upg file (default: the built-in model)")
    _backend_argument(p)
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("-b", "--n-batch", type=int, default=512,
                   help="the most tokens one engine pass takes (default 512; a batch's step: all its prompt chunks)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kv-type", default="f16", choices=("f16", "f32"), help="KV cache type (default f16)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per answer at most (default: until done)")


def _load(args: argparse.Namespace):
    from .llama import Llama
    from .sampling import SamplingParams

    llama = Llama(args.model, n_ctx=args.n_ctx, n_threads=args.threads, kv_type=args.kv_type, backend=args.backend,
                  n_batch=args.n_batch)
    sampling = SamplingParams.from_kwargs(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                          min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed)
    return llama, sampling


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("-s", "--system", help="system prompt")


@subcommand("chat", "chat with a model in the terminal (/reset clears the conversation, /exit quits)",
            _chat_arguments)
def _chat(args: argparse.Namespace) -> int:
    llama, sampling = _load(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and input history)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        for chunk in llama.create_chat_completion(messages, max_tokens=args.max_tokens, stream=True, sampling=sampling):
            text = chunk["choices"][0]["delta"].get("content", "")
            answer.append(text)
            print(text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})


def _complete_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")


@subcommand("complete", "continue a prompt (streamed to stdout)", _complete_arguments)
def _complete(args: argparse.Namespace) -> int:
    llama, sampling = _load(args)
    for chunk in llama.create_completion(args.prompt, max_tokens=args.max_tokens, stop=args.stop, stream=True,
                                         sampling=sampling):
        print(chunk["choices"][0]["text"], end="", flush=True)
    print()
    return 0


def _generated_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generated", choices=GENERATED, default="matvec",
                   help="with --parallel on CUDA: the generated tokens' linear layers by the mat-vec (default: "
                        "the fastest up to 16 streams) or the tensor-core mat-mul (the fastest for 32)")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="model id shown to clients (default: the file name)")
    p.add_argument("--alias", action="append", default=[],
                   help="another model name requests may use (repeatable); other names get 404")
    p.add_argument("--api-key", default=os.environ.get("UPG_API_KEY"),
                   help="require this bearer token (default: $UPG_API_KEY; none: no key)")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="requests served at once, their tokens evaluated together in one pass per step (default 1)")
    p.add_argument("--kv-budget", type=float, default=None, metavar="MIB",
                   help="KV cache of the --parallel slots in MiB, shared out equally (default: --n-ctx per slot)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a free slot; more are answered 429 (default 64)")
    p.add_argument("--queue-timeout", type=float, default=600.0,
                   help="seconds a request may wait for a slot before it is answered 503 (default 600)")
    p.add_argument("--prefill-chunk", type=int, default=32,
                   help="prompt tokens a step takes while other requests decode (default 32; with --n-batch "
                        "as large, every waiting prompt is read before decoding goes on, as llama-server does)")
    _generated_argument(p)


@subcommand("serve", "serve a model over an OpenAI-compatible HTTP API", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise ValueError(f"the server needs its extra dependencies: pip install 'upg-backend[server]' ({e})") from e

    llama, _ = _load(args)
    if args.parallel < 1 or args.queue < 0:
        raise ValueError("--parallel must be at least 1 and --queue at least 0")
    serve(llama, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
          aliases=tuple(args.alias), parallel=args.parallel, kv_budget_mib=args.kv_budget, queue_size=args.queue,
          queue_timeout=args.queue_timeout, prefill_chunk=args.prefill_chunk, generated=args.generated)
    return 0


@subcommand("backends", "list the model backends installed (entry-point group local_llm.backends)")
def _backends(args: argparse.Namespace) -> int:
    from .plugin import ENTRY_POINT_GROUP, discover

    found = discover()
    if not found:
        print(f"no backends installed in the {ENTRY_POINT_GROUP} group")
    for d in found:
        status = f"file types {', '.join(d.backend.file_types)}" if d.backend else f"ERROR {d.error}"
        print(f"{d.entry_point}  [{d.distribution}]  {status}")
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .upg file, or a synthetic shape with random weights: phi-4, phi-4-mini, small")
    p.add_argument("--type", default="q4", help="weight type of a synthetic model (default q4)")
    p.add_argument("--threads", type=int, default=0, help="threads (default: one per core)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="decode length (default 128)")
    p.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    p.add_argument("--kv-type", default="f16", choices=("f16", "f32"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--sampled", action="store_true",
                   help="also decode with sampled tokens (top_k 40, temperature 0.8): by Session.eval_sample "
                        "(candidates from the backend) and by eval + sample (the whole logits row)")
    p.add_argument("--parallel", type=int, nargs="+", metavar="N",
                   help="instead: N streams decoding together in one pass (BatchSession), for each N given, "
                        "against one stream")
    _generated_argument(p)
    _backend_argument(p)


@subcommand("bench", "measure prefill and decode speed, time to first token and peak memory", _bench_arguments)
def _bench(args: argparse.Namespace) -> int:
    import json

    from .bench import run_bench, run_parallel_bench

    if args.parallel:
        p = run_parallel_bench(args.model, args.parallel, type=args.type, threads=args.threads,
                               prompt=args.prompt_tokens, gen=args.gen_tokens, runs=args.runs, kv_type=args.kv_type,
                               backend=args.backend, generated=args.generated)
        print(json.dumps(dataclasses.asdict(p), indent=2) if args.json else p.table())
        return 0
    r = run_bench(args.model, type=args.type, threads=args.threads, prompt=args.prompt_tokens, gen=args.gen_tokens,
                  runs=args.runs, kv_type=args.kv_type, backend=args.backend, sampled=args.sampled)
    print(json.dumps(dataclasses.asdict(r) | {"roofline": r.roofline}, indent=2) if args.json else r.table())
    return 0



def _quality_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the quantized .upg file")
    p.add_argument("--reference", required=True, metavar="SRC",
                   help="the unquantized source: Hugging Face directory, .gguf or .upg (converted to f32 on the fly)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    p.add_argument("--n-ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    _backend_argument(p)


@subcommand("quality", "measure a quantized model's KL divergence and perplexity against its source",
            _quality_arguments)
def _quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .quality import measure

    text = Path(args.text).read_text(encoding="utf-8")
    r = measure(args.model, args.reference, text, n_ctx=args.n_ctx, n_threads=args.threads, backend=args.backend)
    print(f"tokens          {r.n_tokens}")
    print(f"mean KLD        {r.mean_kld:.5f}")
    print(f"p99 KLD         {r.p99_kld:.5f}")
    print(f"perplexity      {r.perplexity:.4f} (reference {r.reference_perplexity:.4f})")
    print(f"top-1 agreement {100 * r.top1_agreement:.2f}%")
    return 0

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upg", description="Run and manage models in the UPG format.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        cmd.arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the `upg` command; returns the exit status. Expected failures (bad files, bad
    arguments, missing files) print one line to stderr, without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (UPGFormatError, ValueError, FileNotFoundError) as e:
        print(f"upg {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
