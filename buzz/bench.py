"""Decode benchmark of every policy on a randomly initialised model of a real shape (no download).

    python -m buzz.bench                      # GPU: Llama-2-7B shape, bf16, the grid of the performance issue
    python -m buzz.bench --shape tiny --device cpu --prompts 64 --batches 1 --decode-steps 4   # CPU smoke

Per point (prompt length x batch x policy x budget): prefill ms, decode ms/step (median over repeats, CUDA events
after warm-up; CUDA-graph replay unless --modes eager), tokens/s, peak allocated memory, stored KV bytes, and the
roofline floor (weight bytes + KV bytes read per step) / measured HBM read bandwidth. An out-of-memory point is
recorded as "oom". `--complexity` streams tokens through each cache and records stored tokens and ms/step as the
number of tokens seen grows. Results: JSON per GPU, a summary for the headline point, and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from buzz.attention import use_kvbench_attention
from buzz.cache import cache_kwarg, make_cache
from buzz.graphs import GraphDecodeStep
from buzz.records import environment, write_json_atomic

SHAPES = {
    # Llama-2-7B's architecture (meta-llama/Llama-2-7b-hf config.json).
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    # The embedded model's architecture (SmolLM2-135M).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(shape: str, dtype: torch.dtype, device: str, layers: int | None = None) -> LlamaForCausalLM:
    cfg = LlamaConfig(**SHAPES[shape], rope_theta=10000.0)
    if layers:
        cfg.num_hidden_layers = layers
    # Long contexts beyond the trained length are fine for timing: weights are random anyway.
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 1 << 17)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class Timer:
    """Wall time of a region, synchronised; CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def read_bandwidth(device: torch.device, gib: float = 4.0) -> float | None:
    """HBM read bandwidth in bytes/s: a float32-accumulated sum over `gib` GiB of bf16, replayed as a CUDA graph
    (copy bandwidth counts writes too and is lower)."""
    if device.type != "cuda":
        return None
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    for _ in range(3):
        torch.sum(x, dim=0, dtype=torch.float32, out=out)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.sum(x, dim=0, dtype=torch.float32, out=out)
    times = []
    for _ in range(10):
        with Timer(device) as t:
            g.replay()
        times.append(t.ms)
    del x, g
    torch.cuda.empty_cache()
    return x_bytes(gib) / (statistics.median(times) / 1e3)


def x_bytes(gib: float) -> int:
    return int(gib * 2**30) // 2 * 2


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kv_bytes_read(cache) -> int:
    """Bytes of K/V the next decode step reads: every slot of every layer's buffer (kept or not)."""
    if isinstance(cache, DynamicCache):
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return cache.kv_bytes()


def stored_tokens(cache) -> float:
    if isinstance(cache, DynamicCache):
        return float(cache.get_seq_length())
    return float(cache.stored_tokens().float().mean())


def policy_params(policy: str, budget) -> dict[str, Any]:
    """Constructor params for a grid point: full and buzz_paper have no budget (buzz_paper: its fixed sizes)."""
    if policy in ("full", "buzz_paper") or budget is None:
        return {}
    return {"budget": budget}


def budgets_for(policy: str, budgets: list) -> list:
    return [None] if policy in ("full", "buzz_paper") else budgets


def measure_point(model, prompt: int, batch: int, policy: str, budget, mode: str, steps: int, repeats: int,
                  device: torch.device) -> dict[str, Any]:  # fmt: skip
    """One grid point. mode: "graph" (our cache, CUDA-graph decode) or "eager" (transformers' DynamicCache for
    full, our cache otherwise, plain eager steps)."""
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kw = cache_kwarg(model)
    use_kvbench_attention(model)  # plain SDPA when no eviction cache is in use
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    if policy == "full" and mode == "eager":
        cache = DynamicCache(config=model.config)  # transformers' own cache, for the baseline everyone uses
    else:
        cache = make_cache(policy, model, **policy_params(policy, budget))
    with torch.inference_mode():
        with Timer(device) as t:
            logits = model(input_ids=ids, logits_to_keep=1, **{kw: cache}).logits
        prefill_ms = t.ms
        token = logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.full((batch, 1), prompt, device=device)
        total_steps = 2 + 1 + steps * repeats  # warm-up, capture, timed
        if mode == "graph" and hasattr(cache, "reserve_steps"):
            cache.reserve_steps(total_steps)
        step = GraphDecodeStep(model, cache, kw) if mode == "graph" else None
        per_step = []
        for i in range(total_steps):
            with Timer(device) as t:
                if step is not None:
                    logits = step(token, pos)
                else:
                    logits = model(input_ids=token, position_ids=pos, **{kw: cache}).logits[:, -1]
            if i >= 3:
                per_step.append(t.ms)
            token = logits.argmax(-1, keepdim=True)
            pos = pos + 1
    chunks = [statistics.fmean(per_step[r * steps : (r + 1) * steps]) for r in range(repeats)]
    decode_ms = statistics.median(chunks)
    out = {
        "prefill_ms": prefill_ms, "decode_ms": decode_ms, "tokens_per_s": batch / decode_ms * 1e3,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "kv_bytes_read": kv_bytes_read(cache), "stored_tokens": stored_tokens(cache),
    }  # fmt: skip
    del cache, step, logits
    free_memory()
    return out


def run_grid(args) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build_model(args.shape, DTYPES[args.dtype], args.device, args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = read_bandwidth(device)
    points: list[dict] = []
    modes = args.modes.split(",")
    policies = args.policies.split(",")

    def measure(prompt: int, batch: int, policy: str, budget, mode: str) -> dict:
        point = {"prompt": prompt, "batch": batch, "policy": policy, "budget": budget, "mode": mode, "status": "ok"}
        try:
            point |= measure_point(model, prompt, batch, policy, budget, mode, args.decode_steps, args.repeats, device)
            if bandwidth:
                point["roofline_ms"] = (weight_bytes + point["kv_bytes_read"]) / bandwidth * 1e3
        except torch.OutOfMemoryError:
            point["status"] = "oom"
            free_memory()
        points.append(point)
        print(json.dumps(point), flush=True)
        if args.points_file:  # one line per point as it is measured: a killed run loses nothing
            with open(args.points_file, "a") as f:
                f.write(json.dumps(point) + "\n")
        return point

    def measure_all(prompt: int, batch: int) -> None:
        for policy in policies:
            for budget in budgets_for(policy, [float(b) for b in args.budgets.split(",")]):
                for mode in modes if policy == "full" else [m for m in modes if m != "eager"] or modes:
                    measure(prompt, batch, policy, budget, mode)

    batches = args.batches.split(",")
    for prompt in [int(p) for p in args.prompts.split(",")]:
        for batch in [int(b) for b in batches if b != "max"]:
            measure_all(prompt, batch)
        if "max" in batches:
            # The largest batch at which a compressed policy fits: double until the probe runs out of memory.
            probe = next(p for p in policies if p != "full")
            budget = min(float(b) for b in args.budgets.split(","))
            batch, fits = max(int(b) for b in batches if b != "max"), None
            while batch <= args.max_batch:
                batch *= 2
                if measure(prompt, batch, probe, budget, modes[0])["status"] == "oom":
                    break
                fits = batch
            if fits:
                policies_left = [p for p in policies if p != probe]
                for policy in policies_left:
                    for b in budgets_for(policy, [float(x) for x in args.budgets.split(",")]):
                        for mode in modes if policy == "full" else [modes[0]]:
                            measure(prompt, fits, policy, b, mode)
    return {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
        "dtype": args.dtype, "weight_bytes": weight_bytes, "read_bandwidth_bytes_per_s": bandwidth,
        "decode_steps": args.decode_steps, "repeats": args.repeats, "points": points, "environment": environment(),
    }  # fmt: skip


def stream_point(model, batch: int, policy: str, params: dict, total: int, prompt: int, every: int,
                 device: torch.device) -> list[dict[str, Any]]:  # fmt: skip
    """Stream `total` tokens (a `prompt`-token prefill, then teacher-forced decode steps) through one cache and
    record, every `every` tokens, the stored tokens and the median decode ms/step of the last stretch.

    Bounded policies keep one captured graph; the full cache reserves each stretch's slots and captures again, so
    its step reads what it holds (its time grows with the context, as it would in any static-cache engine)."""
    free_memory()
    kw = cache_kwarg(model)
    use_kvbench_attention(model)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, total), device=device)
    cache = make_cache(policy, model, **params)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        model(input_ids=ids[:, :prompt], logits_to_keep=1, **{kw: cache})
        seen, step = prompt, None
        while seen < total:
            stretch = min(every, total - seen)
            if policy == "full" or step is None:
                cache.reserve_steps(stretch)
                step = GraphDecodeStep(model, cache, kw)
            times = []
            for _ in range(stretch):
                pos = torch.full((batch, 1), seen, device=device)
                with Timer(device) as t:
                    step(ids[:, seen : seen + 1], pos)
                times.append(t.ms)
                seen += 1
            stored = stored_tokens(cache)
            rows.append({"seen": seen, "stored_tokens": stored, "decode_ms": statistics.median(times[3:] or times),
                         "kv_bytes": cache.kv_bytes()})  # fmt: skip
    del cache, step
    free_memory()
    return rows


def run_complexity(args) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build_model(args.shape, DTYPES[args.dtype], args.device, args.layers)
    curves = []
    for batch in [int(b) for b in args.batches.split(",") if b != "max"]:
        for policy in args.policies.split(","):
            params = {} if policy in ("full", "buzz_paper") else {"budget": args.stream_budget}
            t0 = time.perf_counter()
            try:
                rows, status = stream_point(model, batch, policy, params, args.stream_tokens, args.stream_prompt,
                                            args.stream_every, device), "ok"  # fmt: skip
            except torch.OutOfMemoryError:
                rows, status = [], "oom"
                free_memory()
            curve = {"policy": policy, "batch": batch, "params": params, "status": status, "rows": rows,
                     "fit": fit_growth(rows), "wall_s": time.perf_counter() - t0}  # fmt: skip
            curves.append(curve)
            print(json.dumps({k: v for k, v in curve.items() if k != "rows"}), flush=True)
            if args.points_file:
                with open(args.points_file, "a") as f:
                    f.write(json.dumps(curve) + "\n")
    return {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
            "layers": args.layers, "dtype": args.dtype, "stream_tokens": args.stream_tokens,
            "stream_prompt": args.stream_prompt, "curves": curves, "environment": environment()}  # fmt: skip


def fit_growth(rows: list[dict]) -> dict[str, Any]:
    """Least-squares fits of stored tokens and ms/step against log(n) and n (n = tokens seen): slope and R^2 of
    each; "constant" when neither explains more than half the variance (a bounded cache)."""
    import numpy as np

    if len(rows) < 3:
        return {}
    n = np.array([r["seen"] for r in rows], dtype=float)
    out: dict[str, Any] = {}
    for key in ("stored_tokens", "decode_ms"):
        y = np.array([r[key] for r in rows], dtype=float)
        fits = {}
        for name, x in (("log_n", np.log(n)), ("n", n)):
            a = np.vstack([x, np.ones_like(x)]).T
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            resid = y - a @ coef
            var = float(((y - y.mean()) ** 2).sum())
            fits[name] = {"slope": float(coef[0]), "r2": 1 - float((resid**2).sum()) / var if var > 0 else 0.0}
        best = max(fits, key=lambda k: fits[k]["r2"])
        fits["best"] = best if fits[best]["r2"] > 0.5 else "constant"
        fits["mean"], fits["max"], fits["min"] = float(y.mean()), float(y.max()), float(y.min())
        out[key] = fits
    return out


def summarize(result: dict, prompt: int = 16384, batch: int = 4, budget: float = 0.2) -> dict[str, Any]:
    """The headline point in the fixed form of results/perf/summary.json."""

    def at(policy: str, mode: str | None = None) -> dict | None:
        for p in result["points"]:
            if (
                (p["prompt"], p["batch"], p["policy"]) == (prompt, batch, policy)
                and (p["budget"] is None or p["budget"] == budget)
                and (mode is None or p["mode"] == mode)
            ):
                return p
        return None

    def value(p: dict | None, key: str):
        if p is None:
            return None
        if p["status"] == "oom":
            return "oom"
        return round(p[key], 3) if p.get(key) is not None else None  # no roofline without a GPU bandwidth

    policies = sorted({p["policy"] for p in result["points"]} - {"full"})
    decode, roof, prefill = {}, {}, {}
    fulls = [p for p in (at("full", "graph"), at("full", "eager")) if p is not None]
    best_full = min((p for p in fulls if p["status"] == "ok"), key=lambda p: p["decode_ms"], default=None)
    best_full = best_full or (fulls[0] if fulls else None)
    for name, p in [("full", best_full), ("full_eager", at("full", "eager"))] + [(n, at(n)) for n in policies]:
        decode[name], roof[name], prefill[name] = value(p, "decode_ms"), value(p, "roofline_ms"), value(p, "prefill_ms")
    oom_point = None
    for pr, b in sorted({(p["prompt"], p["batch"]) for p in result["points"]}):
        here = [p for p in result["points"] if (p["prompt"], p["batch"]) == (pr, b)]
        full_oom = all(p["status"] == "oom" for p in here if p["policy"] == "full")
        others_ok = all(p["status"] == "ok" for p in here if p["policy"] != "full")
        if full_oom and others_ok and any(p["policy"] == "full" for p in here):
            oom_point = {"prompt": pr, "batch": b}
            break
    return {
        "gpu": result["gpu"], "shape": result["shape"], "prompt": prompt, "batch": batch, "budget": budget,
        "decode_ms": decode, "roofline_ms": roof, "prefill_ms": prefill, "full_oom_point": oom_point,
    }  # fmt: skip


def markdown_table(result: dict) -> str:
    lines = [
        f"GPU: {result['gpu']}, shape {result['shape']} ({result['dtype']}), read bandwidth "
        f"{(result['read_bandwidth_bytes_per_s'] or 0) / 1e12:.2f} TB/s",
        "",
        "| prompt | batch | policy | budget | mode | prefill ms | decode ms/step | roofline ms | tokens/s | peak GiB |",
        "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        if p["status"] == "oom":
            cells = ["oom"] * 5
        else:
            peak = p.get("peak_bytes")
            cells = [f"{p['prefill_ms']:.1f}", f"{p['decode_ms']:.2f}", f"{p.get('roofline_ms', math.nan):.2f}",
                     f"{p['tokens_per_s']:.0f}", f"{peak / 2**30:.1f}" if peak else "-"]  # fmt: skip
        lines.append(f"| {p['prompt']} | {p['batch']} | {p['policy']} | {p['budget'] or '-'} | {p['mode']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", default="4096,8192,16384,32768")
    ap.add_argument("--batches", default="1,4,8,max")
    ap.add_argument("--policies", default="full,window,streaming_llm,h2o,buzz,buzz_paper")
    ap.add_argument("--budgets", default="0.2,0.4")
    ap.add_argument("--modes", default="graph,eager", help="graph: CUDA-graph decode; eager: plain steps")
    ap.add_argument("--max-batch", type=int, default=256, help="upper limit of the largest-batch search")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/perf")
    ap.add_argument("--name", default=None, help="output file stem (default: the GPU name)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    ap.add_argument("--complexity", action="store_true", help="stream tokens through each cache instead of the grid")
    ap.add_argument("--stream-tokens", type=int, default=32768)
    ap.add_argument("--stream-prompt", type=int, default=1024)
    ap.add_argument("--stream-every", type=int, default=1024)
    ap.add_argument("--stream-budget", type=int, default=564, help="tokens; buzz_paper's peak size by default")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        args.modes = "eager"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    stem = args.name or gpu.replace(" ", "_").lower()
    if args.complexity:
        stem += ".complexity"
    args.points_file = out / f"{stem}.points.jsonl"
    if args.complexity:
        result = run_complexity(args)
        write_json_atomic(out / f"{stem}.json", result)
        return result
    result = run_grid(args)
    write_json_atomic(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown_table(result))
    write_json_atomic(out / f"{stem}.summary.json", summarize(result))
    return result


if __name__ == "__main__":
    main()
