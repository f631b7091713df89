"""Trains upg-backend's built-in model: a miniature Phi-4 (Phi3ForCausalLM) on checkable chats.

One command trains the tokenizer, generates the data, trains, evaluates greedy accuracy per task
on the held-out split and writes a Hugging Face checkpoint (float32 safetensors, config.json,
tokenizer files, generation_config.json) plus training_report.json:

    python3 training/train.py --out DIR [--steps N] [--device cuda]
    python3 training/train.py --out DIR --steps 20 --tiny --device cpu     # smoke test
"""

import argparse
import json
import math
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import Phi3Config, Phi3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import tokenizer as chat_tokenizer  # noqa: E402

MAX_LEN = 160           # longest training conversation in tokens; longer ones are dropped
MAX_POSITIONS = 2048
CHUNK = 20000           # conversations per data-generation task

# (hidden, layers, heads, kv heads, vocab): Phi-4's 4:1 GQA and 3.5x MLP, scaled down.
SIZES = {"full": (256, 6, 8, 2, 2048), "tiny": (64, 2, 4, 1, 512)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory for the checkpoint")
    p.add_argument("--steps", type=int, default=14000,
                   help="optimizer steps (14000 take about 7 minutes on an H100)")
    p.add_argument("--batch", type=int, default=512, help="conversations per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up steps")
    p.add_argument("--pool", type=int, default=2_000_000, help="training conversations generated")
    p.add_argument("--eval-per-task", type=int, default=400, help="held-out questions per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--phi4-dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "phi-4"),
                   help="folder holding Phi-4's tokenizer_config.json (chat template, specials)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model and data set, for a quick smoke test on CPU")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.pool < 1 or args.eval_per_task < 1:
        p.error("--steps, --batch, --pool and --eval-per-task must be positive")
    if args.tiny:
        args.pool, args.batch = min(args.pool, 4000), min(args.batch, 16)
        args.eval_per_task, args.warmup = min(args.eval_per_task, 4), min(args.warmup, 5)
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _encode_chunk(job):
    """Generates and encodes one chunk of training conversations (runs in a worker process)."""
    index, n, seed, tokenizer_json, chat_template = job
    encoder = chat_tokenizer.ChatEncoder(Tokenizer.from_str(tokenizer_json), chat_template)
    rows = [r for r in encoder.encode(list(data.conversations(n, f"{seed}-pool-{index}")))
            if len(r[0]) <= MAX_LEN]
    ids = np.zeros((len(rows), MAX_LEN), np.int16)
    mask = np.zeros((len(rows), MAX_LEN), bool)
    lengths = np.array([len(r[0]) for r in rows], np.int32)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, :len(row_ids)], mask[i, :len(row_mask)] = row_ids, row_mask
    return ids, mask, lengths


def build_pool(n, seed, tok, chat_template):
    """All training conversations as padded int16 ids, loss masks and lengths (deterministic)."""
    jobs = [(i, min(CHUNK, n - i * CHUNK), seed, tok.to_str(), chat_template)
            for i in range(math.ceil(n / CHUNK))]
    if len(jobs) == 1:
        parts = [_encode_chunk(jobs[0])]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            parts = pool.map(_encode_chunk, jobs)
    return tuple(np.concatenate(p) for p in zip(*parts))


def epoch_batches(lengths, batch, rng):
    """One epoch of batches: shuffled, then bucketed by length so little padding is computed."""
    order = rng.permutation(len(lengths))
    group = batch * 32
    batches = []
    for start in range(0, len(order) - batch + 1, group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch] for i in range(0, len(chunk) - batch + 1, batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def model_config(size, ids):
    hidden, layers, heads, kv_heads, vocab = SIZES[size]
    return Phi3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        hidden_act="silu", max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, sliding_window=None,
        initializer_range=0.02, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], use_cache=True)


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def loss_on_answers(model, ids, mask):
    """Mean next-token loss over the assistant tokens (the lm_head runs only where it counts)."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    targets = mask[:, 1:]
    logits = model.lm_head(hidden[targets])
    return F.cross_entropy(logits.float(), ids[:, 1:][targets])


def train(model, pool, args, log):
    """Runs the optimizer for args.steps steps."""
    device = torch.device(args.device)
    ids_all, mask_all, lengths = pool
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    rng = np.random.default_rng(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches, start, running = [], time.time(), []
    model.train()
    for step in range(1, args.steps + 1):
        if not batches:
            batches = epoch_batches(lengths, args.batch, rng)
        idx = np.sort(batches.pop())
        width = int(lengths[idx].max())
        ids = torch.from_numpy(ids_all[idx, :width].astype(np.int64)).to(device, non_blocking=True)
        mask = torch.from_numpy(mask_all[idx, :width]).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args.steps, args.lr, args.warmup)
        with autocast:
            loss = loss_on_answers(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.detach())
        if step % 500 == 0 or step == args.steps:
            log(f"step {step}/{args.steps} loss {torch.stack(running).mean().item():.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - start:.0f}s")
            running = []


@torch.no_grad()
def evaluate(model, encoder, args, log):
    """Greedy held-out accuracy per task: the reply must equal the expected answer exactly."""
    device = torch.device(args.device)
    ids = encoder.ids
    model.eval()
    results = {}
    for task in data.TASKS:
        items = list(data.heldout(args.eval_per_task, args.seed, task=task))
        correct, failures = 0, []
        for start in range(0, len(items), 256):
            part = items[start:start + 256]
            prompts = [encoder.prompt(messages) for messages, _ in part]
            width = max(map(len, prompts))
            batch = torch.full((len(prompts), width), ids["pad"], dtype=torch.long)
            attention = torch.zeros_like(batch)
            for i, p in enumerate(prompts):  # left padding, as generation needs
                batch[i, width - len(p):] = torch.tensor(p)
                attention[i, width - len(p):] = 1
            out = model.generate(input_ids=batch.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=64, do_sample=False,
                                 eos_token_id=[ids["eos"], ids["endoftext"]],
                                 pad_token_id=ids["pad"])
            for (messages, expected), row in zip(part, out[:, width:].tolist()):
                reply = encoder.tok.decode(row, skip_special_tokens=True)
                if reply == expected:
                    correct += 1
                elif len(failures) < 5:
                    failures.append({"question": messages[-1]["content"], "expected": expected,
                                     "reply": reply})
        results[task] = {"accuracy": correct / len(items), "n": len(items), "failures": failures}
        log(f"held-out {task:9s} {correct}/{len(items)} = {correct / len(items):.4f}")
    return results


def save(model, tok, ids, phi4, out):
    """Writes the float32 safetensors checkpoint with Phi-4-style tokenizer/generation files."""
    model.float().save_pretrained(out, safe_serialization=True)
    chat_tokenizer.save_tokenizer(tok, out, MAX_POSITIONS, phi4)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": [ids["eos"], ids["endoftext"]],
                  "pad_token_id": ids["pad"]}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
        f.write("\n")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    began = time.time()

    def log(message):
        print(f"[{time.time() - began:6.1f}s] {message}", flush=True)

    seed_everything(args.seed)
    phi4 = chat_tokenizer.load_phi4_tokenizer_config(args.phi4_dir)
    size = "tiny" if args.tiny else "full"
    corpus = data.tokenizer_corpus(20000 if args.tiny else 100000, f"{args.seed}-tokenizer")
    tok = chat_tokenizer.train_tokenizer(corpus, SIZES[size][4])
    ids = chat_tokenizer.special_ids(tok)
    log(f"tokenizer: {tok.get_vocab_size()} tokens")
    pool = build_pool(args.pool, args.seed, tok, phi4["chat_template"])
    log(f"data: {len(pool[2])} conversations, mean {pool[2].mean():.1f} tokens")

    model = Phi3ForCausalLM(model_config(size, ids)).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params} parameters on {args.device}")
    train(model, pool, args, log)
    train_seconds = time.time() - began

    encoder = chat_tokenizer.ChatEncoder(tok, phi4["chat_template"])
    results = evaluate(model, encoder, args, log)
    save(model.cpu(), tok, ids, phi4, args.out)
    report = {
        "command": "python3 training/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "pool": int(len(pool[2])),
        "parameters": params, "device": (torch.cuda.get_device_name() if args.device == "cuda"
                                         else args.device),
        "torch": torch.__version__, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - began, 1), "heldout": results,
    }
    with open(os.path.join(args.out, "training_report.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    log(f"saved {args.out}; min held-out accuracy "
        f"{min(r['accuracy'] for r in results.values()):.4f}")


if __name__ == "__main__":
    main()
