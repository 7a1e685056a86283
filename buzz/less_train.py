"""Train LESS feature maps (`cache=less cache.kernels=<out>`) for one model, base policy and budget.

    python -m buzz.less_train model=smollm2-135m base=h2o budget=0.1 steps=300 out=results/less/smollm2-h2o-0.1

`model=` (and `model.<key>=`) compose the same model configs as run.py (configs/model/*.yaml); every other key is
listed in DEFAULTS (`base_params.recent=0.5` style for the base policy's keys).

Method (as in LESS, each layer trained separately and independently, the model frozen):

1. Sequences of `seq_len` tokens from text in no evaluation set: offline the Wikitext-2 *validation* split
   (`<data_dir>/wikitext/wikitext-2-v1.validation.jsonl`; the evaluation task uses the test split), online the hub
   dataset `hub_path`/`hub_name`/`split`. One full-attention forward captures every layer's post-RoPE q, k, v.
2. Per layer, the base policy is replayed on those q, k, v exactly as the cache runs it (the first `prefill` tokens in
   one forward, then one token at a time, through buzz.cache.EvictionLayer and the kvbench attention), which gives,
   for each later query row r, the stored set (softmax part) and the set evicted before r (linear part).
3. The layer's maps are trained with Adam so that o_proj(LESS attention) matches o_proj(full attention) (MSE over
   the rows after the prefill, where eviction has happened), in the parallel form of exactly the formula the cache
   applies recurrently (baselines.less.combine). Held-out sequences give the loss before (phi == 0: the base policy
   alone) and after training, per layer.

The kernels and a manifest (model, shapes, base policy, budget, data, steps, losses) go to `<out>/`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from baselines.less import LessKernels, combine
from buzz import cache as core
from buzz.attention import kvbench_attention

REPO = Path(__file__).resolve().parents[1]
DEFAULTS: dict[str, Any] = {
    "base": "h2o",  # the eviction policy LESS wraps (any registered policy but less)
    "base_params": {},  # the base policy's other keys, e.g. {recent: 0.5}
    "budget": 0.1,  # int tokens, or a float fraction of the prefill (as of a prompt in the runner)
    "seq_len": 512,  # tokens per training sequence
    "prefill": 384,  # tokens fed in the first forward; the loss is on the seq_len - prefill rows after it
    "seqs": 32,  # training sequences (held-out ones come on top)
    "val_seqs": 4,  # held-out sequences for the reported losses
    "batch_size": 4,  # sequences per optimiser step
    "steps": 300,  # optimiser steps per layer
    "lr": 1e-3,
    "hidden": 128,  # feature-map MLP width
    "features": 8,  # feature dimension of phi (the state is features x head_dim per KV head)
    "key_scale": 1e-3,  # initial |scale| of phi_k: the linear part starts near zero
    "data_dir": "auto",  # auto (../shared/data or $KVBENCH_DATA_DIR, else the hub), hub, or a path
    "offline_file": "wikitext/wikitext-2-v1.validation.jsonl",
    "hub_path": "Salesforce/wikitext",
    "hub_name": "wikitext-2-raw-v1",
    "split": "validation",
    "device": "auto",
    "seed": 0,
    "out": None,  # null: results/less/<model>-<base>-b<budget>
}

# ------------------------------------------------------------------------------------------------ activations

_CAPTURE: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
CAPTURE = "kvbench_less_capture"


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain causal attention that records the layer's post-RoPE q, k, v (unpadded training sequences)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    _CAPTURE[module.layer_idx] = (query.detach().cpu(), key.detach().cpu(), value.detach().cpu(), scale)
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, lambda **kw: None)


@torch.no_grad()
def capture_qkv(model, ids: torch.Tensor, batch_size: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """Every layer's (q (N, Hq, T, D), k (N, Hkv, T, D), v (N, Hkv, T, Dv), scaling), on the CPU, from full
    attention over `ids` (N, T)."""
    device = next(model.parameters()).device
    impl = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    per_layer: dict[int, list] = {}
    try:
        for start in range(0, len(ids), batch_size):
            _CAPTURE.clear()
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            for i, qkvs in _CAPTURE.items():
                per_layer.setdefault(i, []).append(qkvs)
    finally:
        model.set_attn_implementation(impl)
        _CAPTURE.clear()
    return [
        (*(torch.cat([c[j] for c in per_layer[i]]) for j in range(3)), per_layer[i][0][3]) for i in sorted(per_layer)
    ]


def attention_modules(model) -> list:
    """The attention modules (with `o_proj`), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "o_proj") and isinstance(getattr(m, "layer_idx", None), int)]
    return sorted(mods, key=lambda m: m.layer_idx)


# ------------------------------------------------------------------------------------------------ base policy replay


@torch.no_grad()
def replay_base(
    base: str, budget: Any, base_params: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefill: int,
    scaling: float, layer_idx: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Run the base policy on one layer's q, k, v as the cache does (prefill, then one token per forward).

    Returns kept (N, Hkv, T - prefill, T) bool: row i holds the positions stored after the forward that ended at
    token prefill + i - 1, i.e. the slots query row prefill + i attends to (besides itself)."""
    policy = core.make_policy(base, **({} if budget is None else {"budget": budget}), **base_params)
    layer = core.EvictionLayer(policy, layer_idx)
    stub = SimpleNamespace(layer_idx=layer_idx)
    n, hkv, t, _ = k.shape
    rows = []
    try:
        for a, b in [(0, prefill)] + [(i, i + 1) for i in range(prefill, t - 1)]:
            layer.update(k[:, :, a:b], v[:, :, a:b])
            kvbench_attention(stub, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling)
            stored = torch.zeros(n, hkv, t + 1, dtype=torch.bool, device=k.device)
            stored.scatter_(2, layer.pos.masked_fill(~layer.valid, t), True)
            rows.append(stored[..., :t])
    finally:
        core._PENDING["layer"] = None
    return torch.stack(rows, 2)


# ------------------------------------------------------------------------------------------------ one layer


class LayerData:
    """One layer's training tensors for the rows after the prefill (all float32 on `device`)."""

    def __init__(self, q, k, v, kept: torch.Tensor, prefill: int, scaling: float, o_proj, device) -> None:
        q, k, v = (x.to(device=device, dtype=torch.float32) for x in (q, k, v))
        n, hq, t, d = q.shape
        hkv, r = k.shape[1], t - prefill
        g = hq // hkv
        rows = torch.arange(prefill, t, device=device)
        before = torch.arange(t, device=device) < rows[:, None]  # (R, T): p < r
        self_ = torch.arange(t, device=device) == rows[:, None]
        kept = kept.to(device)
        soft = kept | self_  # (N, Hkv, R, T)
        self.lin = before & ~kept  # evicted before row r
        self.q, self.k, self.v = q[:, :, prefill:], k, v
        self.g, self.prefill = g, prefill
        w = o_proj.weight.detach().float().to(device)
        bias = o_proj.bias.detach().float().to(device) if getattr(o_proj, "bias", None) is not None else None
        self.o_proj = lambda x: F.linear(x, w, bias)
        soft_out, lse, target = [], [], []
        for i in range(n):  # one sequence at a time bounds the (Hq, R, T) logits
            logits = torch.einsum("hgrd,htd->hgrt", self.q[i].view(hkv, g, r, d), k[i]) * scaling
            full = logits.masked_fill(~(before | self_), -math.inf)
            part = logits.masked_fill(~soft[i, :, None], -math.inf)
            target.append(self._merge(torch.einsum("hgrt,htd->hgrd", full.softmax(-1), v[i]), 1))
            soft_out.append(torch.einsum("hgrt,htd->hgrd", part.softmax(-1), v[i]).reshape(hq, r, -1))
            lse.append(part.logsumexp(-1).reshape(hq, r))
        self.soft_out, self.lse = torch.stack(soft_out), torch.stack(lse)
        self.target = self.o_proj(torch.cat(target))

    @staticmethod
    def _merge(x: torch.Tensor, b: int) -> torch.Tensor:
        """(B*Hkv..., g, R, D) per-head outputs -> (B, R, Hq*D)."""
        x = x.reshape(b, -1, x.shape[-2], x.shape[-1])
        return x.transpose(1, 2).reshape(b, x.shape[2], -1)

    def less_out(self, maps, idx: torch.Tensor) -> torch.Tensor:
        """o_proj of the LESS attention of sequences `idx`, (b, R, hidden)."""
        q, k, v = self.q[idx], self.k[idx], self.v[idx]
        b, hq, r, _ = q.shape
        hkv = k.shape[1]
        pq = maps.phi_q(q).view(b, hkv, self.g, r, -1)
        pk = maps.phi_k(k)
        a = torch.einsum("bhgrf,bhtf->bhgrt", pq, pk) * self.lin[idx][:, :, None]
        num = torch.einsum("bhgrt,bhtd->bhgrd", a, v).reshape(b, hq, r, -1)
        den = a.sum(-1).reshape(b, hq, r)
        out = combine(self.soft_out[idx], self.lse[idx], num, den)
        return self.o_proj(out.transpose(1, 2).reshape(b, r, -1))

    def base_out(self, idx: torch.Tensor) -> torch.Tensor:
        b, hq, r, _ = self.soft_out[idx].shape
        return self.o_proj(self.soft_out[idx].transpose(1, 2).reshape(b, r, -1))

    def loss(self, maps, idx: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.less_out(maps, idx), self.target[idx])


def train_layer(
    maps, data: LayerData, train_idx: torch.Tensor, val_idx: torch.Tensor, steps: int, lr: float, batch_size: int,
    generator: torch.Generator,
) -> dict[str, float]:  # fmt: skip
    """Adam on one layer's maps; returns held-out losses before (phi == 0, the base policy) and after."""
    with torch.no_grad():
        before = F.mse_loss(data.base_out(val_idx), data.target[val_idx]).item()
        init = data.loss(maps, val_idx).item()
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.1)
    train_loss = float("nan")
    for _ in range(steps):
        pick = train_idx[torch.randperm(len(train_idx), generator=generator)[:batch_size]]
        loss = data.loss(maps, pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_loss = loss.item()
    with torch.no_grad():
        after = data.loss(maps, val_idx).item()
    return {"before": before, "init": init, "after": after, "train_last": train_loss}


def train_kernels(
    model, ids: torch.Tensor, *, base: str = "h2o", budget: Any = 0.1, base_params: dict | None = None,
    prefill: int, steps: int, lr: float = 1e-3, hidden: int = 128, features: int = 8, key_scale: float = 1e-3,
    batch_size: int = 4, val_seqs: int = 1, seed: int = 0, device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[LessKernels, list[dict[str, float]]]:  # fmt: skip
    """Train every layer's maps on the token sequences `ids` (N, T); the last `val_seqs` are held out."""
    if not 0 < prefill < ids.shape[1]:
        raise ValueError(f"prefill={prefill} is invalid; allowed: 0 < prefill < seq_len={ids.shape[1]}")
    if not 0 < val_seqs < len(ids):
        raise ValueError(f"val_seqs={val_seqs} is invalid; allowed: 1 .. {len(ids) - 1} for {len(ids)} sequences")
    base_params = dict(base_params or {})
    device = torch.device(device or next(model.parameters()).device)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config.get_text_config()
    t0 = time.perf_counter()
    acts = capture_qkv(model, ids, batch_size)
    if log:
        log(f"captured q/k/v of {len(acts)} layers for {ids.numel()} tokens in {time.perf_counter() - t0:.1f}s")
    heads, kv_heads, head_dim = acts[0][0].shape[1], acts[0][1].shape[1], acts[0][0].shape[-1]
    kernels = LessKernels.create(len(acts), heads, kv_heads, head_dim, hidden, features, key_scale)
    o_projs = [m.o_proj for m in attention_modules(model)]
    if len(o_projs) != len(acts):
        raise ValueError(f"found {len(o_projs)} attention modules with o_proj for {len(acts)} layers")
    n = len(ids)
    train_idx, val_idx = torch.arange(n - val_seqs, device=device), torch.arange(n - val_seqs, n, device=device)
    report = []
    for li, (q, k, v, scaling) in enumerate(acts):
        torch.manual_seed(seed + li)
        gen = torch.Generator().manual_seed(seed + li)
        kept = replay_base(base, budget, base_params, q, k, v, prefill, scaling, li)
        data = LayerData(q, k, v, kept, prefill, scaling, o_projs[li], device)
        maps = kernels.maps[li].to(device).train()
        res = train_layer(maps, data, train_idx, val_idx, steps, lr, batch_size, gen)
        maps.eval().requires_grad_(False).cpu()
        report.append({"layer": li, **res})
        if log:
            log(f"layer {li:3d}: held-out MSE base {res['before']:.4g} -> LESS {res['after']:.4g} "
                f"(train {res['train_last']:.4g})  [{time.perf_counter() - t0:.0f}s]")  # fmt: skip
        del data, kept
        acts[li] = None  # free the layer's activations
    kernels.manifest["model_type"] = getattr(cfg, "model_type", None)
    return kernels, report


# ------------------------------------------------------------------------------------------------ CLI


def _parse(argv: Sequence[str]):
    from omegaconf import OmegaConf

    model_ovs, rest = [], []
    for a in argv:
        if "=" not in a:
            raise ValueError(f"argument {a!r} is invalid; allowed: key=value (e.g. model=smollm2-135m budget=0.1)")
        (model_ovs if a.split("=", 1)[0].lstrip("+~").split(".")[0] == "model" else rest).append(a)
    args = OmegaConf.from_dotlist(rest)
    for key in args:
        if key not in DEFAULTS:
            raise ValueError(f"unknown key {key!r}; allowed: model, {', '.join(DEFAULTS)}")
    merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), args)
    return model_ovs, OmegaConf.to_container(merged, resolve=True)


def _model_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from buzz.cli import group_options

    for ov in overrides:
        key, value = ov.split("=", 1)
        if key == "model" and value not in group_options("model"):
            raise ValueError(f"model={value} is unknown; allowed: {', '.join(group_options('model'))}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides).model


def load_text(args: dict) -> tuple[str, dict]:
    from buzz.runner import resolve_data_dir
    from buzz.tasks.base import load_hub_rows, read_jsonl

    data_dir = resolve_data_dir(args["data_dir"])
    if data_dir is None:
        rows = load_hub_rows(args["hub_path"], args["hub_name"], args["split"])
        source = {"origin": "hub", "location": f"{args['hub_path']}:{args['hub_name']}", "split": args["split"]}
    else:
        path = Path(data_dir) / args["offline_file"]
        if not path.exists():
            raise ValueError(f"{path} not found; set data_dir (a folder laid out as ../shared/data) or data_dir=hub")
        rows = read_jsonl(path)
        source = {"origin": "offline", "location": str(path), "split": "validation"}
    return "".join(r["text"] for r in rows), source


def main(argv: Sequence[str] | None = None) -> dict:
    from buzz.models import load_model, resolve_device

    model_ovs, args = _parse(sys.argv[1:] if argv is None else argv)
    model_cfg = _model_cfg(model_ovs)
    device = resolve_device(str(args["device"]))
    log = lambda m: print(f"[less_train] {m}", file=sys.stderr, flush=True)
    torch.manual_seed(args["seed"])
    model, tok = load_model(model_cfg, device)
    text, source = load_text(args)
    n_seqs, t = args["seqs"] + args["val_seqs"], args["seq_len"]
    token_ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(token_ids) < n_seqs * t:
        raise ValueError(f"the data has {len(token_ids)} tokens, fewer than seqs+val_seqs={n_seqs} x seq_len={t}")
    ids = torch.tensor(token_ids[: n_seqs * t]).view(n_seqs, t)
    source["tokens"] = n_seqs * t
    log(f"model={model_cfg.name} base={args['base']} budget={args['budget']} on {n_seqs} x {t} tokens ({source})")
    t0 = time.perf_counter()
    kernels, report = train_kernels(
        model, ids, base=args["base"], budget=args["budget"], base_params=args["base_params"],
        prefill=args["prefill"], steps=args["steps"], lr=args["lr"], hidden=args["hidden"],
        features=args["features"], key_scale=args["key_scale"], batch_size=args["batch_size"],
        val_seqs=args["val_seqs"], seed=args["seed"], device=device, log=log,
    )  # fmt: skip
    mean = lambda key: sum(r[key] for r in report) / len(report)
    kernels.manifest.update({
        "model": model_cfg.name, "repo_id": model_cfg.get("repo_id"), "base": args["base"],
        "base_params": args["base_params"], "budget": args["budget"], "seq_len": t, "prefill": args["prefill"],
        "data": source, "seqs": args["seqs"], "val_seqs": args["val_seqs"], "steps": args["steps"], "lr": args["lr"],
        "batch_size": args["batch_size"], "key_scale": args["key_scale"], "seed": args["seed"],
        "loss_base": mean("before"), "final_loss": mean("after"), "layers": report,
        "train_seconds": round(time.perf_counter() - t0, 1),
    })  # fmt: skip
    out = args["out"] or REPO / "results" / "less" / f"{model_cfg.name}-{args['base']}-b{args['budget']}"
    kernels.save(out)
    log(f"mean held-out MSE over layers: base {mean('before'):.4g} -> LESS {mean('after'):.4g}; saved to {out}")
    return kernels.manifest


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
