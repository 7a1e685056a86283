"""On two GPUs: a model split over them (half the decoder layers on each) decodes through every eviction cache like
the same model on one GPU, with each layer's cache on that layer's GPU.

    python scripts/multigpu_check.py [--prompt 4096] [--batch 2] [--steps 32] [--out results/perf/multigpu.json]

Builds the Llama-2-7B-shape random bf16 model once on cuda:0 and, per policy, prefills a random prompt and feeds
`--steps` teacher-forced eager decode steps (the same tokens on both placements, so a difference cannot snowball),
keeping the logits. Then it moves the same weights in place to the split placement (accelerate's dispatch_model:
embeddings and layers 0..n/2-1 on cuda:0, the rest plus norm and head on cuda:1) and repeats. Per policy: decode
ms/step (CUDA events, median after the warm-up steps) single and split, per-device peak allocated bytes, max |logit
difference|, argmax agreement, and whether every layer's cache buffers lived on that layer's device and dtype.
Exits 1 when a policy is not ok. `check()` also runs on CPU (tiny shape, devices cpu,cpu) for the tests.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from buzz.bench import DTYPES, Timer, build_model, policy_params  # noqa: E402
from buzz.cache import cache_kwarg, make_cache  # noqa: E402
from buzz.models import dispatch, follow_devices, layer_device_map  # noqa: E402

POLICIES = ["full", "window", "streaming_llm", "h2o", "buzz", "buzz_paper"]
ARGMAX_AGREE_MIN = 0.99  # argmax ties in bf16 may flip where the two runs differ in rounding
LOGIT_DIFF_MAX = 0.05  # of the largest |logit| of the single-device run


def split_map(model, devices: tuple[str, str]) -> dict[str, int | str]:
    """Half the decoder layers on each device: embeddings with the first half, norm and head with the second."""
    n = model.config.num_hidden_layers
    return layer_device_map(model.config, [devices[0]] * (n // 2) + [devices[1]] * (n - n // 2))


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peaks(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def _peaks(devices: list[torch.device]) -> dict[str, int]:
    out = {}
    for d in devices:
        if d.type == "cuda":
            out[str(d)] = int(torch.cuda.max_memory_allocated(d))
        else:  # CPU: the process's peak resident set (Linux reports KiB)
            out[str(d)] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return out


def layer_devices(model) -> list[torch.device]:
    return [next(layer.parameters()).device for layer in model.model.layers]


def cache_placement_errors(model, cache) -> list[str]:
    """Cache layers whose buffers are not on their decoder layer's device, or not in the model's dtype."""
    dtype = next(model.parameters()).dtype
    errors = []
    for i, (layer, want) in enumerate(zip(cache.layers, layer_devices(model))):
        if not layer.is_initialized:
            errors.append(f"layer {i}: never initialised")
            continue
        tensors = {"keys": layer.keys, "values": layer.values, "valid": layer.valid, "pos": layer.pos}
        tensors |= {"seen": layer.seen, "budget": layer.budget, "score": layer.score, **layer.fields}
        for name, t in tensors.items():
            if t is not None and t.device != want:
                errors.append(f"layer {i}: {name} on {t.device}, its decoder layer on {want}")
        for name in ("keys", "values"):
            if tensors[name].dtype != dtype:
                errors.append(f"layer {i}: {name} is {tensors[name].dtype}, the model {dtype}")
    return errors


@torch.inference_mode()
def decode(model, policy: str, ids: torch.Tensor, prompt: int, warmup: int, budget: float, devices) -> dict[str, Any]:
    """Prefill ids[:, :prompt], then teacher-forced eager decode steps over the rest. Returns the logits of every
    forward's last position (steps + 1, B, vocab) as float32 on the CPU, ms per step, peaks and placement errors."""
    _free()
    _reset_peaks(devices)
    first = devices[0]
    kw = cache_kwarg(model)
    cache = make_cache(policy, model, **policy_params(policy, budget))
    batch, steps = ids.shape[0], ids.shape[1] - prompt
    logits = [model(input_ids=ids[:, :prompt], logits_to_keep=1, **{kw: cache}).logits[:, -1].float()]
    ms = []
    for i in range(steps):
        pos = torch.full((batch, 1), prompt + i, device=first)
        with Timer(first) as t:
            out = model(input_ids=ids[:, prompt + i : prompt + i + 1], position_ids=pos, **{kw: cache}).logits
        ms.append(t.ms)
        logits.append(out[:, -1].float())
    result = {
        "logits": torch.stack(logits).cpu(),
        "decode_ms": statistics.median(ms[warmup:] or ms),
        "peak_bytes": _peaks(devices),
        "placement_errors": cache_placement_errors(model, cache),
        "stored_tokens": cache.stored_tokens().tolist(),
    }
    del cache, logits, out
    _free()
    return result


def check(
    model, devices: tuple[str, str] = ("cuda:0", "cuda:1"), policies: list[str] = POLICIES, prompt: int = 4096,
    batch: int = 2, steps: int = 32, warmup: int = 4, budget: float = 0.2, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Run every policy on `model` (all on devices[0]), then split the same model in place over `devices` and run
    them again. The model stays split afterwards."""
    first = torch.device(devices[0])
    all_devices = sorted({torch.device(d) for d in devices}, key=str)
    if first.type == "cuda":
        torch.cuda.set_device(first)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt + steps), generator=gen).to(first)
    single = {p: decode(model, p, ids, prompt, warmup, budget, all_devices) for p in policies}

    device_map = split_map(model, devices)
    # dispatch() forces accelerate's hooks: a cpu,cpu map (the tests) also goes through the per-block input moves.
    model = dispatch(model, device_map)
    follow_devices(model)
    _free()
    results: dict[str, Any] = {}
    for p in policies:
        split = decode(model, p, ids, prompt, warmup, budget, all_devices)
        a, b = single[p]["logits"], split["logits"]
        diff = float((a - b).abs().max())
        scale = float(a.abs().max())
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        errors = single[p]["placement_errors"] + split["placement_errors"]
        ok = not errors and agree >= ARGMAX_AGREE_MIN and diff <= LOGIT_DIFF_MAX * max(scale, 1.0)
        results[p] = {
            "decode_ms_single": single[p]["decode_ms"], "decode_ms_split": split["decode_ms"],
            "peak_bytes_single": single[p]["peak_bytes"], "peak_bytes_split": split["peak_bytes"],
            "max_abs_logit_diff": diff, "max_abs_logit": scale, "argmax_agree": agree,
            "stored_tokens": split["stored_tokens"], "placement_errors": errors, "ok": ok,
        }  # fmt: skip
        print(
            f"{p:>14}: decode {single[p]['decode_ms']:.2f} ms single, {split['decode_ms']:.2f} ms split;"
            f" max |logit diff| {diff:.3g}; argmax agree {agree:.4f}; {'ok' if ok else 'FAILED ' + '; '.join(errors)}",
            flush=True,
        )
    return {
        "devices": list(devices),
        "device_map": {k: str(v) for k, v in device_map.items()},
        "layer_devices": [str(d) for d in layer_devices(model)],
        "prompt": prompt, "batch": batch, "steps": steps, "warmup": warmup, "budget": budget,
        "tolerance": {"argmax_agree_min": ARGMAX_AGREE_MIN, "max_abs_logit_diff_rel": LOGIT_DIFF_MAX},
        "policies": results,
        "ok": all(r["ok"] for r in results.values()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps, warm-up included")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.2, help="for the policies that take one")
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--out", default="results/perf/multigpu.json")
    args = ap.parse_args(argv)
    devices = tuple(args.devices.split(","))
    if len(devices) != 2:
        print(f"multigpu_check: --devices={args.devices} is invalid; allowed: two devices, e.g. cuda:0,cuda:1")
        return 2
    need = max((int(d[5:] or 0) + 1 for d in devices if d.startswith("cuda")), default=0)
    if need and torch.cuda.device_count() < max(need, 2):
        print(f"multigpu_check: needs >= 2 CUDA GPUs, found {torch.cuda.device_count()}; nothing to check")
        return 1

    from buzz.records import environment, write_json_atomic

    model = build_model(args.shape, DTYPES[args.dtype], devices[0])
    out = check(model, devices, args.policies.split(","), args.prompt, args.batch, args.steps, args.warmup, args.budget)
    gpus = [torch.cuda.get_device_name(d) for d in devices if d.startswith("cuda")]
    out = {"shape": args.shape, "dtype": args.dtype, "gpus": gpus, **out, "environment": environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), out)
    print(f"{'all ok' if out['ok'] else 'FAILED'}: {args.out}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
