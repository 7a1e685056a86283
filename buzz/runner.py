"""Runs one job (model x cache x task): generation or perplexity through the evicting cache, scoring, records."""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import math
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from buzz.cache import EvictionCache, cache_kwarg, make_cache, make_policy
from buzz.records import RunRecords, config_hash, environment

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_KEYS = {"model", "cache", "task", "logger", "seed", "device", "batch_size", "limit", "data_dir"}
TOP_LEVEL_KEYS |= {"output_dir", "progress", "cuda_graphs"}

logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs every scorer it builds
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)


class ConfigError(ValueError):
    """A bad configuration: its message is one line naming the bad value and the allowed ones."""


# ------------------------------------------------------------------------------------------------ config


def validate(cfg: DictConfig) -> None:
    """Check every part of a composed config without loading anything heavy. Raises ConfigError (one line)."""
    from buzz.models import validate_model_cfg
    from buzz.tasks import build_task
    from buzz.wandb_logger import validate_logger_cfg

    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} is invalid; allowed: an int >= 1")
    if cfg.limit is not None and (not _is_int(cfg.limit) or cfg.limit < 1):
        raise ConfigError(f"limit={cfg.limit!r} is invalid; allowed: an int >= 1 or null")
    if not _is_int(cfg.seed):
        raise ConfigError(f"seed={cfg.seed!r} is invalid; allowed: an int")
    if cfg.get("cuda_graphs", "auto") not in ("auto", True, False):
        raise ConfigError(f"cuda_graphs={cfg.cuda_graphs!r} is invalid; allowed: auto, true, false")
    if cfg.progress not in ("auto", True, False):
        raise ConfigError(f"progress={cfg.progress!r} is invalid; allowed: auto, true, false")
    dev = str(cfg.device)
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device={dev!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
    resolve_data_dir(cfg.data_dir)
    try:
        validate_model_cfg(cfg.model)
        build_task(cfg.task)
        cache_policy(cfg.cache)
        validate_logger_cfg(cfg.logger)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cache_params(cache_cfg: DictConfig) -> dict[str, Any]:
    params = OmegaConf.to_container(cache_cfg, resolve=True)
    params.pop("name")
    return params


def cache_policy(cache_cfg: DictConfig):
    """Build (and so validate) the policy a cache config names; unknown keys get the allowed ones listed."""
    from buzz.cache import load_policies

    name = cache_cfg.get("name")
    policies = load_policies()
    if name not in policies:
        raise ConfigError(f"cache={name} is unknown; allowed: {', '.join(sorted(policies))}")
    params = cache_params(cache_cfg)
    allowed = [p for p in inspect.signature(policies[name].__init__).parameters if p != "self"]
    for key in params:
        if key not in allowed:
            raise ConfigError(f"cache.{key} is not a key of cache={name}; allowed: {', '.join(['name', *allowed])}")
    return make_policy(name, **params)


def resolve_data_dir(value: Any) -> Path | None:
    """None means the Hub (online users); otherwise the offline data directory."""
    if value in (None, "hub"):
        return None
    if value == "auto":
        for cand in (os.environ.get("KVBENCH_DATA_DIR"), REPO.parent / "shared" / "data"):
            if cand and Path(cand).is_dir():
                return Path(cand)
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data_dir={value} is not a directory; allowed: auto, hub, or an existing path")
    return path


def run_dir_for(cfg: DictConfig, data_origin: str) -> Path:
    """Readable and deterministic: results/runs/<task>/<model>/<cache>-b<budget>-<hash of what changes results>."""
    identity = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "cache": OmegaConf.to_container(cfg.cache, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
        "data": data_origin,
    }
    budget = cfg.cache.get("budget")
    label = cfg.cache.name if budget is None else f"{cfg.cache.name}-b{budget}"
    return Path(cfg.output_dir) / cfg.task.name / cfg.model.name / f"{label}-{config_hash(identity)}"


def show_progress(cfg: DictConfig) -> bool:
    return (not os.environ.get("CI")) if cfg.progress == "auto" else bool(cfg.progress)


# ------------------------------------------------------------------------------------------------ decoding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def prefill_forwards(model, cache: EvictionCache, kw: str, ids, mask, pos) -> Iterator[torch.Tensor]:
    """Prefill a left-padded batch; yields the logits of the last column (B, 1, vocab) after each forward. One forward,
    unless the policy has a `prefill_stride`: then forwards of that many tokens, the first one shorter, so that they
    end at the prompt's end and every sample's real tokens are cut where they would be if it ran alone."""
    width = ids.shape[1]
    stride = getattr(cache.policy, "prefill_stride", None) or width
    if stride < width:  # the core resolves a fractional budget at the first forward: give it the whole prompt
        cache.policy.prompt_tokens = mask.sum(-1)
    bounds = [0, *range(width % stride or stride, width + 1, stride)]
    for a, b in zip(bounds, bounds[1:]):
        # Without padding, no mask: the cache then takes the flash (is_causal) path for the prefill.
        m = None if bool(mask[:, :b].all()) else mask[:, :b]
        p = None if pos is None else pos[:, a:b]
        yield model(input_ids=ids[:, a:b], attention_mask=m, position_ids=p, logits_to_keep=1, **{kw: cache}).logits


# Policies whose decode step is verified equal as a CUDA-graph replay and eagerly (scripts/gpu_check.py).
GRAPH_SAFE_POLICIES = {"full", "window", "streaming_llm", "h2o", "buzz", "buzz_paper", "cascading"}


def use_cuda_graphs(setting: Any, device: torch.device, policy: str) -> bool:
    if setting == "auto":
        return device.type == "cuda" and policy in GRAPH_SAFE_POLICIES
    return bool(setting) and device.type == "cuda"


def decode_stepper(model, cache: EvictionCache, kw: str, graphs: bool, steps: int):
    """`step(ids (B, 1), pos (B, 1)) -> logits (B, vocab)`: a CUDA-graph replay when `graphs` (the whole step, eviction
    included, launched at once; the logits buffer is reused, so read it before the next step), else eager."""
    if graphs:
        from buzz.graphs import GraphDecodeStep

        cache.reserve_steps(steps)  # a growing cache needs its slots before capture
        return GraphDecodeStep(model, cache, kw)
    return lambda ids, pos: model(input_ids=ids, position_ids=pos, **{kw: cache}).logits[:, -1]


@torch.inference_mode()
def generate_greedy(
    model, prompts: Sequence[Sequence[int]], cache: EvictionCache, max_new_tokens: int, eos_ids: set[int],
    pad_id: int, progress: bool = False, graphs: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy decoding of a left-padded batch through `cache`. Per sample: new token ids, stored-token trace
    (after each forward), and the batch's timings."""
    device = next(model.parameters()).device
    kw = cache_kwarg(model)
    ids, mask = left_pad(prompts, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    eos = torch.tensor(sorted(eos_ids), device=device)
    _sync(device)
    t0 = time.perf_counter()
    *_, logits = prefill_forwards(model, cache, kw, ids, mask, pos)
    token = logits[:, -1].argmax(-1)
    stored = [cache.stored_tokens()]
    _sync(device)
    t_first = time.perf_counter()
    tokens = [token]
    done = torch.isin(token, eos)
    step = decode_stepper(model, cache, kw, graphs, max_new_tokens)
    for _ in tqdm(range(max_new_tokens - 1), desc="tokens", leave=False, disable=not progress):
        if bool(done.all()):
            break
        # Decode tokens are never padding, and padded slots are already invalid in the cache: no mask needed.
        pos = pos[:, -1:] + 1
        token = torch.where(done, pad_id, step(token[:, None], pos).argmax(-1))
        tokens.append(token)
        stored.append(cache.stored_tokens())
        done |= torch.isin(token, eos)
    _sync(device)
    t_end = time.perf_counter()
    steps = len(tokens) - 1
    out_tokens = torch.stack(tokens, 1).tolist()
    trace = torch.stack(stored, 1).tolist()
    prefill_ms = (t_first - t0) * 1e3
    decode_ms = (t_end - t_first) * 1e3 / steps if steps else float("nan")
    results = []
    for i, row in enumerate(out_tokens):
        n = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append({
            # n forwards made this sample's tokens; later ones only fed its EOS and padding while the batch ran on.
            "new_tokens": row[:n], "stored_trace": trace[i][:n],
            "prefill_ms": prefill_ms, "decode_ms_per_step": decode_ms, "batch_tokens_per_s": len(prompts) * steps
            / max(t_end - t_first, 1e-9), "batch_size": len(prompts),
        })  # fmt: skip
    return results


def stream_buckets(n: int, prefix: int, bucket_tokens: int | None) -> list[tuple[int, int]]:
    """(first, end) stream positions of each position bucket: [k * bucket_tokens, (k + 1) * bucket_tokens) cut to the
    scored tokens [prefix, n) (buckets inside the prefix are dropped). One bucket of everything when None."""
    if bucket_tokens is None:
        return [(prefix, n)]
    first = prefix // bucket_tokens
    return [
        (max(k * bucket_tokens, prefix), min((k + 1) * bucket_tokens, n)) for k in range(first, -(-n // bucket_tokens))
    ]


@torch.inference_mode()
def stream_nll(
    model, streams: torch.Tensor, prefix: int, cache: EvictionCache, progress: bool = False, graphs: bool = False,
    bucket_tokens: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Teacher-forced negative log-likelihood of each stream's tokens after the first `prefix`, fed one at a time
    through the cache (a single full-window forward would never evict). The token at stream position t is scored
    from the cache holding (what is kept of) positions < t. With `bucket_tokens`, also per position bucket
    (`stream_buckets`): NLL sums, scored tokens, first positions, and the mean stored tokens while scoring them.

    Nothing in the loop waits for the device: sums accumulate in device tensors (the bucket of each position is
    known on the host in advance) and the stored-token trace goes into a preallocated device tensor; one copy to
    the host at the end."""
    from buzz.metrics import token_nll

    device = next(model.parameters()).device
    kw = cache_kwarg(model)
    streams = streams.to(device)
    b, n = streams.shape
    buckets = stream_buckets(n, prefix, bucket_tokens)
    bucket_of = [k for k, (first, end) in enumerate(buckets) for _ in range(first, end)]  # per scored position
    nll = torch.zeros(b, dtype=torch.float64, device=device)
    bucket_nll = torch.zeros(b, len(buckets), dtype=torch.float64, device=device)
    if not getattr(cache.policy, "evicts", True):
        # A cache that never evicts sees exactly what one causal forward sees: score the stream in chunks of
        # FULL_STREAM_CHUNK tokens (the same numbers as one token at a time, tested; seconds instead of hours).
        t0, t_first = _score_in_chunks(model, streams, prefix, cache, kw, bucket_of, nll, bucket_nll)
        trace = [list(range(prefix, n))] * b  # it stores every token it has seen
        extra = {"scored_in_chunks": FULL_STREAM_CHUNK}
    else:
        # stored[:, j]: tokens stored when scoring position prefix + j (after the prefill, then after each step).
        stored = torch.zeros(b, n - prefix, dtype=torch.long, device=device)
        _sync(device)
        t0 = time.perf_counter()
        prompt = streams[:, :prefix]
        *_, logits = prefill_forwards(model, cache, kw, prompt, torch.ones_like(prompt), None)
        logits = logits[:, -1]
        stored[:, 0] = cache.stored_tokens()
        _sync(device)
        t_first = time.perf_counter()
        step = decode_stepper(model, cache, kw, graphs, n - prefix)
        for t in tqdm(range(prefix, n), desc="tokens", leave=False, disable=not progress):
            token = token_nll(logits[:, None], streams[:, t : t + 1]).double().view(b)
            nll += token
            if bucket_tokens is not None:
                bucket_nll[:, bucket_of[t - prefix]] += token
            if t + 1 < n:
                logits = step(streams[:, t : t + 1], torch.full((b, 1), t, device=device))
                stored[:, t + 1 - prefix] = cache.stored_tokens()
        trace = stored.tolist()
        extra = {}
    _sync(device)
    t_end = time.perf_counter()
    steps = max(n - prefix - 1, 1)
    outs = [
        {
            "nll_sum": float(nll[i]),
            "n_tokens": n - prefix,
            "stored_trace": trace[i],
            "prefill_ms": (t_first - t0) * 1e3,
            "decode_ms_per_step": (t_end - t_first) * 1e3 / steps,
            "batch_tokens_per_s": b * steps / max(t_end - t_first, 1e-9),
            "batch_size": b,
            **extra,
        }  # fmt: skip
        for i in range(b)
    ]
    if bucket_tokens is not None:
        sums = bucket_nll.tolist()
        for out, row in zip(outs, sums):
            kv = out["stored_trace"]
            out["buckets"] = {
                "bucket_start": [first for first, _ in buckets],
                "bucket_tokens": [end - first for first, end in buckets],
                "bucket_nll_sum": row,
            }
            out["bucket_kv_tokens_mean"] = [
                statistics.fmean(kv[first - prefix : end - prefix]) for first, end in buckets
            ]
    return outs


FULL_STREAM_CHUNK = 2048


def _score_in_chunks(model, streams, prefix, cache, kw, bucket_of, nll, bucket_nll) -> tuple[float, float]:
    """Teacher-forced NLL through a cache that never evicts, in causal forwards of FULL_STREAM_CHUNK tokens after
    the prefix; adds into `nll` (B,) and `bucket_nll` (B, buckets). Returns the start and end-of-prefix times."""
    from buzz.metrics import token_nll

    device, n = streams.device, streams.shape[1]
    _sync(device)
    t0 = t_first = time.perf_counter()
    bounds = [0, prefix, *range(prefix + FULL_STREAM_CHUNK, n - 1, FULL_STREAM_CHUNK), n - 1]
    bucket_idx = torch.tensor(bucket_of, device=device)
    for a, z in zip(bounds, bounds[1:]):
        logits = model(input_ids=streams[:, a:z], **{kw: cache}).logits  # position t predicts t + 1
        if a == 0:
            logits = logits[:, -1:]  # the prefix's last position scores the first scored token
            a = z - 1
            _sync(device)
            t_first = time.perf_counter()
        per_token = token_nll(logits[..., None, :], streams[:, a + 1 : z + 1, None]).double()  # (B, z - a)
        nll += per_token.sum(-1)
        bucket_nll.index_add_(1, bucket_idx[a + 1 - prefix : z + 1 - prefix], per_token)
    return t0, t_first


# ------------------------------------------------------------------------------------------------ the job


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":  # summed over the GPUs (a model split by model.device_map uses several)
        return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))
    # CPU: the process's peak resident set (Linux reports KiB).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory_bytes_per_device(device: torch.device) -> dict[str, int] | None:
    """{"cuda:0": bytes, "cuda:1": ...} where this process sees several GPUs, else None."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return None
    return {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configured job to completion (resuming finished samples) and return its summary."""
    from buzz.models import is_split, load_model, resolve_device
    from buzz.tasks import build_task
    from buzz.wandb_logger import RunLogger

    validate(cfg)
    task = build_task(cfg.task)
    data_dir = resolve_data_dir(cfg.data_dir)
    try:
        samples, source = task.load(data_dir, cfg.limit)
    except ValueError as e:  # a missing data file: the task's one-line message names it and what to set
        raise ConfigError(str(e).splitlines()[0]) from e
    if not samples:
        raise ConfigError(f"task={cfg.task.name} has no samples in {source.location}")
    # Synthetic rows get their own run directory: a real data file added later must not resume synthetic results.
    run_dir = run_dir_for(cfg, source.origin + (":synthetic" if source.synthetic else ""))
    records = RunRecords(run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    records.write_json("config.json", resolved)
    done = records.samples()
    todo = [s for s in samples if s.id not in done]
    progress = show_progress(cfg)
    print(f"[kvbench] {cfg.task.name} x {cfg.model.name} x {cfg.cache.name}: {len(samples)} samples "
          f"({len(samples) - len(todo)} already done) -> {run_dir}", file=sys.stderr)  # fmt: skip

    status, error = "done", None
    logger = RunLogger(cfg.logger, run_name=str(run_dir.relative_to(cfg.output_dir)), config=resolved, run_dir=run_dir)
    device = torch.device(resolve_device(str(cfg.device)))
    max_positions = None
    if todo:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(cfg.model, str(device))
        device = next(model.parameters()).device
        if device.type == "cuda":
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        per_token = kv_bytes_per_token(model, next(model.parameters()).dtype)
        # The context the model was trained for (RoPE positions past it are out of distribution; tables mark it).
        max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        params = cache_params(cfg.cache)
        if task.kind == "perplexity" and isinstance(params.get("budget"), float):
            # A fractional budget for perplexity is a fraction of the stream length (the whole evaluated text).
            params["budget"] = max(1, math.floor(params["budget"] * task.stream_tokens))
        eos_ids = {
            i for i in _as_list(model.generation_config.eos_token_id) + [tokenizer.eos_token_id] if i is not None
        }
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        # A model split over GPUs decodes eagerly: one graph cannot capture work on several devices.
        graphs = use_cuda_graphs(cfg.get("cuda_graphs", "auto"), device, cfg.cache.name) and not is_split(model)
        bar = tqdm(total=len(todo), desc="samples", disable=not progress)
        for batch in _chunks(todo, cfg.batch_size):
            encoded = [task.encode(s, tokenizer) for s in batch]
            cache = make_cache(cfg.cache.name, model, **params)
            try:
                if task.kind == "perplexity":
                    outs = stream_nll(
                        model, torch.tensor(encoded), task.prefix_tokens, cache, progress, graphs, task.bucket_tokens
                    )
                else:
                    outs = generate_greedy(
                        model, encoded, cache, task.max_new_tokens, eos_ids, pad_id, progress, graphs
                    )
                # Policy state beside the K/V slots (e.g. LESS's linear-attention state) counts in the memory figures.
                extra = (cache.extra_bytes_per_token(), cache.extra_state_bytes())
            except torch.OutOfMemoryError as e:
                status, error = "oom", str(e).splitlines()[0]
                break
            finally:
                del cache
            for sample, ids, out in zip(batch, encoded, outs):
                rec = _sample_record(task, tokenizer, sample, ids, out, per_token, extra)
                records.append(rec)
                logger.log_sample(rec)
                done[sample.id] = rec
            bar.update(len(batch))
        bar.close()
    summary = _summarize(cfg, task, source, [done[s.id] for s in samples if s.id in done], status, error, run_dir)
    summary["peak_memory_bytes"] = peak_memory_bytes(device) if todo else None
    summary["peak_memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
    summary["peak_memory_bytes_per_device"] = peak_memory_bytes_per_device(device) if todo else None
    summary["model_max_positions"] = max_positions
    if not todo:  # nothing ran now: keep what the run that computed the samples measured
        previous = records.summary() or {}
        summary["model_max_positions"] = previous.get("model_max_positions")
        summary["peak_memory_bytes"] = previous.get("peak_memory_bytes")
        summary["peak_memory_kind"] = previous.get("peak_memory_kind", summary["peak_memory_kind"])
        summary["peak_memory_bytes_per_device"] = previous.get("peak_memory_bytes_per_device")
    records.write_json("summary.json", summary)
    logger.finish(summary)
    print_summary(summary)
    return summary


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _sample_record(
    task, tokenizer, sample, prompt_ids, out: dict, per_token: int, extra: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    trace = out.pop("stored_trace")
    decode_trace = trace[1:] or trace
    # The per-step trace is summarised here (after prefill, mean, peak; per bucket for streams), never stored.
    rec: dict[str, Any] = {"id": sample.id, "prompt_tokens": len(prompt_ids)} | task.record_fields(sample)
    if task.kind == "perplexity":
        rec["metrics"] = task.score_stream(out.pop("nll_sum"), out.pop("n_tokens"), out.pop("buckets", None))
        seen = len(prompt_ids) - 1  # the stream's last token is only scored, never fed
    else:
        new = out.pop("new_tokens")
        text = tokenizer.decode(new, skip_special_tokens=True)
        rec |= {"prediction": text, "new_tokens": len(new), "reference": sample.reference}
        rec["metrics"] = task.score(sample, text)
        seen = len(prompt_ids) + len(new) - 1  # the last new token is never fed: a full cache stores the rest
    rec |= {
        "kv_tokens_after_prefill": trace[0], "kv_tokens_peak": max(trace),
        "kv_tokens_mean": statistics.fmean(decode_trace),
        "kv_bytes_peak": max(trace) * (per_token + extra[0]) + extra[1], "kv_bytes_full": seen * per_token,
    }  # fmt: skip
    return rec | out


def _summarize(cfg, task, source, recs: list[dict], status: str, error: str | None, run_dir: Path) -> dict:
    metrics = task.aggregate([r["metrics"] for r in recs]) if recs else {}

    def mean(key: str) -> float | None:
        vals = [r[key] for r in recs if r.get(key) is not None and not math.isnan(r[key])]
        return statistics.fmean(vals) if vals else None

    kv_peak, kv_full = mean("kv_bytes_peak"), mean("kv_bytes_full")
    return {
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": status, "error": error, "run_dir": str(run_dir), "n": len(recs),
        "task": cfg.task.name, "model": cfg.model.name, "cache": cfg.cache.name,
        "budget": cfg.cache.get("budget"), "metrics": metrics, "metric_info": getattr(task, "metric_info", {}),
        "data": source.to_dict(),
        "kv_tokens_peak": max((r["kv_tokens_peak"] for r in recs), default=None),
        "kv_tokens_mean": mean("kv_tokens_mean"), "kv_bytes_peak_mean": kv_peak, "kv_bytes_full_mean": kv_full,
        "kv_ratio_vs_full": kv_peak / kv_full if kv_peak and kv_full else None,
        "prefill_ms": mean("prefill_ms"), "decode_ms_per_token": mean("decode_ms_per_step"),
        "tokens_per_s": mean("batch_tokens_per_s"),
        # the largest batch that ran (a stream task has as many rows as streams, whatever batch_size says)
        "batch_size": max((r.get("batch_size") or 0 for r in recs), default=0) or cfg.batch_size,
        "config": OmegaConf.to_container(cfg, resolve=True), "environment": environment(),
    }  # fmt: skip


def print_summary(s: dict) -> None:
    def fmt(v):
        if isinstance(v, list):  # per-bucket figures of a stream
            return "[" + ", ".join(map(fmt, v)) + "]"
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    data = s["data"]
    lines = [
        f"== {s['task']} x {s['model']} x {s['cache']} (budget {fmt(s['budget'])}): {s['status']}, n={s['n']}",
        "   " + "  ".join(f"{k}={fmt(v)}" for k, v in s["metrics"].items()),
        f"   data: {data.get('origin')} {data.get('location')} ({'SYNTHETIC' if data.get('synthetic') else 'real'})",
        f"   KV tokens stored: mean {fmt(s['kv_tokens_mean'])}, peak {fmt(s['kv_tokens_peak'])};"
        f" KV bytes/sample {fmt(s['kv_bytes_peak_mean'])} vs full {fmt(s['kv_bytes_full_mean'])}"
        f" ({fmt(s['kv_ratio_vs_full'])}x)",
        f"   prefill {fmt(s['prefill_ms'])} ms, decode {fmt(s['decode_ms_per_token'])} ms/step,"
        f" {fmt(s['tokens_per_s'])} tok/s (batch {s['batch_size']}), peak memory {fmt(s['peak_memory_bytes'])} B",
        f"   records: {s['run_dir']}/samples.jsonl, summary.json",
    ]
    if s.get("error"):
        lines.append(f"   error: {s['error']}")
    print("\n".join(lines))
