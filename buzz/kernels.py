"""GPU kernels for scoring during prefill.

Heavy-hitter policies need, for every prompt token, the attention it receives summed over all later query rows.
Materialising the (q x q) weights costs several passes over q^2 floats per layer; instead the output and each
row's log-sum-exp come from PyTorch's flash attention, and one Triton kernel recomputes Q.K^T tile by tile and sums
exp(s - lse) down the columns in registers: about half an attention forward of extra work, no q^2 memory.
Used for unpadded prefills of an empty cache on CUDA in half precision; everything else takes the PyTorch path
in `buzz.attention`, which the GPU check (`scripts/gpu_check.py`) compares this kernel against.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _causal_column_sums(
        Q, K, LSE, OUT,
        sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sl_b, sl_h, so_b, so_h,
        H, GROUP, N_CTX, scale_log2, log2e,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = tl.load(
            K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
            mask=offs_n[:, None] < N_CTX, other=0.0,
        )  # fmt: skip
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start_m = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # queries before this key block never see it
        for m0 in range(start_m, N_CTX, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = tl.load(
                Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :],
                mask=offs_m[:, None] < N_CTX, other=0.0,
            )  # fmt: skip
            lse = tl.load(LSE + b * sl_b + h * sl_h + offs_m, mask=offs_m < N_CTX, other=0.0)
            s = tl.dot(q, tl.trans(k))
            p = tl.exp2(s * scale_log2 - lse[:, None] * log2e)
            seen = (offs_m[:, None] >= offs_n[None, :]) & (offs_m[:, None] < N_CTX)
            acc += tl.sum(tl.where(seen, p, 0.0), axis=0)
        tl.store(OUT + b * so_b + h * so_h + offs_n, acc, mask=offs_n < N_CTX)


def fused_prefill_available(query: torch.Tensor) -> bool:
    return (
        triton is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] in (16, 32, 64, 128, 256)
    )


def causal_attention_with_column_sums(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q queries over the same q keys (no padding). Returns the output (B, Hq, q, D) and the
    float32 column sums of the attention weights per query head (B, Hq, q)."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k_rep = key.repeat_interleave(group, 1) if group > 1 else key
    v_rep = value.repeat_interleave(group, 1) if group > 1 else value
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, k_rep, v_rep, 0.0, True, False, scale=scale)[:2]
    sums = torch.empty(b, hq, n, dtype=torch.float32, device=query.device)
    block_m, block_n = 64, 64
    grid = (b * hq, triton.cdiv(n, block_n))
    _causal_column_sums[grid](
        query, key, lse, sums,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        lse.stride(0), lse.stride(1), sums.stride(0), sums.stride(1),
        hq, group, n, scale * LOG2E, LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, D=d, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out, sums
