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

from buzz.cache import combine_heads

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


if triton is not None:

    @triton.jit
    def _decode_split(
        Q, K, V, VALID, M_OUT, L_OUT, ACC, S_OUT,
        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h,
        HKV, GROUP, C, SPLIT, scale_log2,
        G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WRITE_S: tl.constexpr,
    ):  # fmt: skip
        # One program: the GROUP query heads of one KV head, over keys [split * SPLIT, (split + 1) * SPLIT).
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        rows = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        hq = hk * GROUP + rows
        q = tl.load(Q + b * sq_b + hq[:, None] * sq_h + offs_d[None, :], mask=rows[:, None] < GROUP, other=0.0)
        m = tl.full([G_PAD], -float("inf"), dtype=tl.float32)
        l_sum = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D], dtype=tl.float32)
        start = split * SPLIT
        for n0 in range(start, tl.minimum(start + SPLIT, C), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_range = offs_n < C
            k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                        mask=in_range[:, None], other=0.0)  # fmt: skip
            ok = tl.load(VALID + b * sm_b + hk * sm_h + offs_n, mask=in_range, other=0) != 0
            s = tl.dot(q, tl.trans(k)) * scale_log2  # log2 units
            s = tl.where(ok[None, :], s, -float("inf"))
            if WRITE_S:
                tl.store(S_OUT + (b * HKV * GROUP + hq[:, None]) * C + offs_n[None, :], s,
                         mask=(rows[:, None] < GROUP) & in_range[None, :])  # fmt: skip
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
                        mask=in_range[:, None], other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        n_split = tl.num_programs(1)
        base = (b * HKV * GROUP + hq) * n_split + split
        tl.store(M_OUT + base, m, mask=rows < GROUP)
        tl.store(L_OUT + base, l_sum, mask=rows < GROUP)
        tl.store(ACC + base[:, None] * D + offs_d[None, :], acc, mask=rows[:, None] < GROUP)


def fused_decode_available(query: torch.Tensor) -> bool:
    return (
        triton is not None
        and query.is_cuda
        and query.shape[2] == 1
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] in (16, 32, 64, 128, 256)
    )


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float | None,
    scores: torch.Tensor | None = None, score_heads: str = "sum",
) -> torch.Tensor:  # fmt: skip
    """One query token per sequence over the slot buffer, split over the keys (flash-decoding), masked by
    `valid` (B, Hkv, C). When `scores` (B, Hkv, C) is given, the attention each slot receives, summed over the
    group's query heads (`score_heads="max"`: their maximum), is added to it. Returns (B, Hq, 1, D)."""
    b, hq, _, d = query.shape
    hkv, c = keys.shape[1], keys.shape[2]
    group = hq // hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    block_n = 64
    # Enough programs to fill the GPU several times over, each over whole blocks of keys.
    n_split = max(1, min(triton.cdiv(c, block_n), triton.cdiv(4 * 132, b * hkv)))
    split = triton.cdiv(triton.cdiv(c, n_split), block_n) * block_n
    n_split = triton.cdiv(c, split)
    f32 = dict(dtype=torch.float32, device=query.device)
    m = torch.empty(b, hq, n_split, **f32)
    l_sum = torch.empty(b, hq, n_split, **f32)
    acc = torch.empty(b, hq, n_split, d, **f32)
    s_out = torch.empty(b, hq, c, **f32) if scores is not None else m
    valid_u8 = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    _decode_split[(b * hkv, n_split)](
        query, keys, values, valid_u8, m, l_sum, acc, s_out,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), valid_u8.stride(0), valid_u8.stride(1),
        hkv, group, c, split, scale * LOG2E,
        G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, D=d, WRITE_S=scores is not None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    m_all = m.amax(-1, keepdim=True)
    m_all = torch.where(torch.isinf(m_all), 0.0, m_all)
    w = torch.exp2(m - m_all)
    denom = (l_sum * w).sum(-1, keepdim=True)
    out = (acc * w.unsqueeze(-1)).sum(2) / denom
    if scores is not None:
        lse2 = m_all + torch.log2(denom)  # (B, Hq, 1), log2 units
        scores += combine_heads(torch.exp2(s_out - lse2).view(b, hkv, group, c), score_heads)
    return out.unsqueeze(2).to(query.dtype)


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
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, k_rep, v_rep, 0.0, True, False, scale=scale)[
        :2
    ]
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
