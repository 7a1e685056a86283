"""LESS (Dong et al., ICML 2024): an eviction policy plus a constant-size linear-attention state of what it evicts.

The wrapped base policy (any registered one, `h2o` by default) decides what stays in the slots. Every token it
evicts, prefill included, is folded into a per-layer, per-KV-head float32 state

    H += phi_k(k)^T v        (features x head_dim)        z += phi_k(k)        (features)

and every later query attends to the stored tokens exactly and to the evicted ones through the state, both
normalised together:

    out = (sum_stored exp(s_i) v_i + phi_q(q) H) / (sum_stored exp(s_i) + phi_q(q) . z),    s_i = q . k_i * scale

computed from the softmax output and its log-sum-exp `lse` over the stored slots (see `combine`). A forward's
queries see the state as it was before the forward; its own evictions are folded in afterwards, so every seen token
is counted exactly once, by the softmax or by the state.

Feature maps (learned per layer, `buzz.less_train`): as in the LESS code, separate maps for queries and keys, one per
head: phi_q per query head, phi_k per KV head (the query heads of a GQA group share their KV head's state, as
LESS's multi-query Falcon shares one key map). Each is a two-layer MLP head_dim -> hidden -> features with a GELU,
made non-negative by a softplus; phi_k is multiplied by a learned per-feature |scale| (LESS's `scalingD`), which
starts small so training starts from the base policy. Unlike the LESS code there is no extra key interaction
layer. Keys' features are computed once, when a token is written, and kept beside its slot (one float32 slot field
per feature), so any base policy is folded exactly at O(slots x features x head_dim) per step.

`kernels=null` builds maps whose key scale is exactly 0: phi_k == 0, the state stays zero and the output equals the
base policy's (an ablation / test setting that still pays LESS's compute and memory).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from buzz.cache import LayerState, Policy, load_policies, register_policy

KERNELS_FILE = "kernels.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "kvbench-less-1"
TINY = torch.finfo(torch.float32).tiny


def combine(soft_out: torch.Tensor, lse: torch.Tensor, lin_num: torch.Tensor, lin_den: torch.Tensor) -> torch.Tensor:
    """Joint normalisation of the exact softmax part and the linear part, in log space.

    soft_out (..., D): softmax-weighted average of the stored values; lse (...): log sum_stored exp(s_i);
    lin_num (..., D) = phi_q(q) H and lin_den (...) = phi_q(q) . z >= 0. Returns, in float32,
    (exp(lse) soft_out + lin_num) / (exp(lse) + lin_den). With lin_den == 0 (and so lin_num == 0) it returns
    soft_out exactly; gradients stay finite there.
    """
    soft_out, lse, lin_num, lin_den = soft_out.float(), lse.float(), lin_num.float(), lin_den.float()
    has = lin_den > 0
    log_den = torch.where(has, lin_den.clamp_min(TINY).log(), -math.inf)
    norm = torch.logaddexp(lse, log_den)
    w_soft = (lse - norm).exp().unsqueeze(-1)
    w_lin = (log_den - norm).exp().unsqueeze(-1)
    return soft_out * w_soft + (lin_num / lin_den.clamp_min(TINY).unsqueeze(-1)) * w_lin


class FeatureMaps(nn.Module):
    """phi_q (one map per query head) and phi_k (one per KV head) of one layer; see the module docstring."""

    def __init__(
        self, heads: int, kv_heads: int, head_dim: int, hidden: int = 128, features: int = 8, key_scale: float = 1e-3
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.hidden, self.features = hidden, features

        def uniform(*shape: int) -> nn.Parameter:
            a = math.sqrt(6.0 / (shape[-2] + shape[-1]))
            return nn.Parameter(torch.empty(*shape).uniform_(-a, a))

        self.q_w1, self.q_b1 = uniform(heads, head_dim, hidden), nn.Parameter(torch.zeros(heads, hidden))
        self.q_w2, self.q_b2 = uniform(heads, hidden, features), nn.Parameter(torch.zeros(heads, features))
        self.k_w1, self.k_b1 = uniform(kv_heads, head_dim, hidden), nn.Parameter(torch.zeros(kv_heads, hidden))
        self.k_w2, self.k_b2 = uniform(kv_heads, hidden, features), nn.Parameter(torch.zeros(kv_heads, features))
        self.k_scale = nn.Parameter(torch.full((kv_heads, features), float(key_scale)))

    @staticmethod
    def _mlp(x, w1, b1, w2, b2):
        h = F.gelu(torch.einsum("bhtd,hde->bhte", x, w1) + b1[:, None])
        return F.softplus(torch.einsum("bhte,hef->bhtf", h, w2) + b2[:, None])

    def phi_q(self, q: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, head_dim) -> (B, heads, T, features), float32, >= 0."""
        return self._mlp(q.float(), self.q_w1, self.q_b1, self.q_w2, self.q_b2)

    def phi_k(self, k: torch.Tensor) -> torch.Tensor:
        """(B, kv_heads, T, head_dim) -> (B, kv_heads, T, features), float32, >= 0."""
        return self._mlp(k.float(), self.k_w1, self.k_b1, self.k_w2, self.k_b2) * self.k_scale.abs()[:, None]


class LessKernels(nn.Module):
    """Every layer's feature maps plus the manifest that says what they were trained for."""

    def __init__(self, maps: list[FeatureMaps], manifest: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.maps = nn.ModuleList(maps)
        self.manifest = dict(manifest or {})

    @classmethod
    def create(
        cls, layers: int, heads: int, kv_heads: int, head_dim: int, hidden: int = 128, features: int = 8,
        key_scale: float = 1e-3, manifest: dict[str, Any] | None = None,
    ) -> LessKernels:  # fmt: skip
        maps = [FeatureMaps(heads, kv_heads, head_dim, hidden, features, key_scale) for _ in range(layers)]
        shape = {"num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}
        return cls(maps, {**(manifest or {}), **shape, "hidden": hidden, "features": features})

    def save(self, out: str | Path) -> Path:
        """Write `<out>/kernels.safetensors` and `<out>/manifest.json`; returns the directory."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / KERNELS_FILE), metadata={"format": FORMAT})
        (out / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, **self.manifest}, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> LessKernels:
        """From a directory written by `save` (or its kernels.safetensors). One-line ValueError when missing."""
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        folder = path.parent if path.suffix == ".safetensors" else path
        weights, manifest_path = folder / KERNELS_FILE, folder / MANIFEST_FILE
        if not weights.exists() or not manifest_path.exists():
            raise ValueError(
                f"cache.kernels={path}: no {KERNELS_FILE} + {MANIFEST_FILE} there; train them with "
                "`python -m buzz.less_train model=<model> base=<policy> budget=<budget> out=<dir>`"
            )
        m = json.loads(manifest_path.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"cache.kernels={path}: manifest format {m.get('format')!r}; allowed: {FORMAT}")
        kernels = cls.create(
            m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"], m["hidden"], m["features"], 0.0, m
        )
        kernels.load_state_dict(load_file(str(weights)))
        return kernels.requires_grad_(False).eval()


@register_policy
class Less(Policy):
    """LESS over a base eviction policy; see the module docstring. `kernels`: a directory from `buzz.less_train`
    (or null: phi == 0, the base policy's output). `model_name`: the model in use, checked against the manifest."""

    name = "less"

    def __init__(
        self, budget: int | float | None = 0.5, base: str = "h2o", base_params: dict[str, Any] | None = None,
        kernels: str | None = None, model_name: str | None = None,
    ) -> None:  # fmt: skip
        policies = load_policies()
        if base == self.name or base not in policies:
            allowed = ", ".join(sorted(p for p in policies if p != self.name))
            raise ValueError(f"cache.base={base!r} is invalid for less; allowed: {allowed}")
        if base_params is not None and not isinstance(base_params, dict):
            raise ValueError(f"cache.base_params={base_params!r} is invalid; allowed: a mapping of {base}'s keys")
        try:
            self.base = policies[base](**({} if budget is None else {"budget": budget}), **(base_params or {}))
        except TypeError as e:
            raise ValueError(f"cache=less, base={base}: {e}") from None
        if self.base.positions != "absolute":  # the folded state holds keys at their absolute positions
            raise ValueError(
                f"cache.base_params.positions={self.base.positions!r} is invalid for less; allowed: absolute"
            )
        self.budget = self.base.budget
        self.needs_scores = self.base.needs_scores
        self.per_head = getattr(self.base, "per_head", False)
        self.base_name, self.base_params, self.model_name = base, dict(base_params or {}), model_name
        if kernels == "???":
            raise ValueError(
                "cache.kernels is required for cache=less: a directory from `python -m buzz.less_train`, "
                "or null for the phi == 0 ablation (the base policy plus LESS's overhead)"
            )
        self.kernels = None if kernels is None else str(kernels)
        self._kernels = None if kernels is None else LessKernels.load(kernels)
        self._null_maps: dict[int, FeatureMaps] = {}
        if self._kernels is not None:
            m = self._kernels.manifest
            if model_name is not None and m.get("model") != model_name:
                raise ValueError(self._mismatch(model_name))
            if m.get("base") not in (None, base):  # usable, but say so (the budget is free to differ)
                warnings.warn(
                    f"cache.kernels={kernels} were trained for base={m['base']}; running base={base}", stacklevel=2
                )
        self.features = self._kernels.manifest["features"] if self._kernels is not None else 8
        self.slot_fields = {
            **self.base.slot_fields,
            **{self._field(i): (torch.float32, 0.0) for i in range(self.features)},
        }
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (H (B,Hkv,F,Dv), z (B,Hkv,F))

    # --- delegated to the base policy -----------------------------------------------------------------------
    def resolve_budget(self, prompt_tokens: torch.Tensor) -> torch.Tensor:
        return self.base.resolve_budget(prompt_tokens)

    def size_bound(self, *args: int) -> int:
        return self.base.size_bound(*args)

    def describe(self) -> dict[str, Any]:
        return {"budget": self.budget, "base": self.base_name, "base_params": self.base_params,
                "kernels": self.kernels, "features": self.features}  # fmt: skip

    # --- kernels ---------------------------------------------------------------------------------------------
    @staticmethod
    def _field(i: int) -> str:
        return f"less_phi{i}"

    def _mismatch(self, in_use: str) -> str:
        m = self._kernels.manifest
        trained = (
            f"model {m.get('model')} ({m['num_layers']} layers, {m['num_heads']} heads, {m['num_kv_heads']} KV heads, "
            f"head_dim {m['head_dim']})"
        )
        return f"cache.kernels={self.kernels} were trained for {trained}, but the model in use is {in_use}"

    def _maps(self, layer_idx: int, heads: int | None, kv_heads: int, head_dim: int, device, module: Any = None):
        """Layer `layer_idx`'s maps on `device`; checks them against the model in use (one-line ValueError)."""
        if self._kernels is None:  # kernels=null: phi_k == 0 (key scale exactly 0), built to the model's shapes
            maps = self._null_maps.get(layer_idx)
            if maps is None or (heads is not None and maps.heads != heads):  # query heads are known at attention
                maps = FeatureMaps(heads or kv_heads, kv_heads, head_dim, 128, self.features, key_scale=0.0)
                self._null_maps[layer_idx] = maps.requires_grad_(False)
        else:
            k, config = self._kernels, getattr(module, "config", None)
            layers = getattr(config, "num_hidden_layers", None)
            maps = k.maps[layer_idx] if layer_idx < len(k.maps) else None
            wrong = maps is None or (maps.kv_heads, maps.head_dim) != (kv_heads, head_dim)
            if wrong or (heads is not None and maps.heads != heads) or (layers is not None and layers != len(k.maps)):
                name = self.model_name or getattr(config, "name_or_path", None) or "?"
                shape = f"{layers or f'at least {layer_idx + 1}'} layers, {heads or '?'} heads, {kv_heads} KV heads"
                raise ValueError(self._mismatch(f"{name} ({shape}, head_dim {head_dim})"))
        if maps.k_scale.device != torch.device(device):
            maps.to(device)
        return maps

    # --- the policy ------------------------------------------------------------------------------------------
    def keep(self, s: LayerState) -> torch.Tensor | None:
        if s.keys is None or s.values is None:
            raise RuntimeError("cache=less needs LayerState.keys/values (buzz.cache passes them)")
        b, hkv, c, d = s.keys.shape
        maps = self._maps(s.layer_idx, None, hkv, d, s.keys.device)
        # Features of the new tokens' keys, kept beside their slots until the base policy evicts them.
        k_new = s.keys.gather(2, s.new_slots.unsqueeze(-1).expand(-1, -1, -1, d))
        with torch.no_grad():
            phi_new = maps.phi_k(k_new)
        for i in range(self.features):
            s.fields[self._field(i)].scatter_(2, s.new_slots, phi_new[..., i])
        keep = self.base.keep(s)
        if s.step == 1 or s.layer_idx not in self._state:  # first forward of a generation: empty state
            dv = s.values.shape[-1]
            self._state[s.layer_idx] = (
                torch.zeros(b, hkv, self.features, dv, dtype=torch.float32, device=s.keys.device),
                torch.zeros(b, hkv, self.features, dtype=torch.float32, device=s.keys.device),
            )
        if keep is None:
            return None
        h, z = self._state[s.layer_idx]
        gone = (s.valid & ~keep).float()  # (B, Hkv, C): evicted by this forward
        phi = torch.stack([s.fields[self._field(i)] for i in range(self.features)], -1) * gone.unsqueeze(-1)
        h += torch.einsum("bhcf,bhcd->bhfd", phi, s.values.float())
        z += phi.sum(2)
        return keep

    def mix_attention(self, layer, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, module: Any = None):
        """The attention hook: `out` (B, q, Hq, Dv) is the softmax over the stored slots, `lse` (B, Hq, q) its
        log-sum-exp; returns the joint LESS output in out's layout and dtype."""
        b, hq, q, d = query.shape
        h, z = self._state[layer.layer_idx]
        hkv, f, dv = h.shape[1:]
        maps = self._maps(layer.layer_idx, hq, hkv, d, query.device, module)
        with torch.no_grad():
            pq = maps.phi_q(query).view(b, hkv, hq // hkv, q, f)
        num = torch.einsum("bhgqf,bhfd->bhgqd", pq, h).reshape(b, hq, q, dv)
        den = torch.einsum("bhgqf,bhf->bhgq", pq, z).reshape(b, hq, q)
        mixed = combine(out.transpose(1, 2), lse, num, den)
        return mixed.transpose(1, 2).to(out.dtype).contiguous()

    def extra_state_bytes(self) -> int:
        """Bytes per sample of the recurrent state (H and z, float32, all layers); 0 before the first forward."""
        total = 0
        for h, z in self._state.values():
            total += (h[0].numel() + z[0].numel()) * 4
        return total

    def extra_bytes_per_token(self) -> int:
        """Bytes per stored token of the key features kept beside the slots (float32, all layers seen)."""
        if not self._state:
            return 0
        return sum(h.shape[1] for h, _ in self._state.values()) * self.features * 4
