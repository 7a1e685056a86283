"""On a GPU: CUDA-graph decode equals eager decode for every policy (tiny random Llama, float32).

python scripts/gpu_check.py [policy ...]      # a name may end in +in_cache (positions=in_cache) or +max
                                              # (head_reduction=max: scores take the max over a group's heads)
"""

import sys

import torch

from buzz.bench import build_model
from buzz.cache import cache_kwarg, make_cache
from buzz.graphs import GraphDecodeStep

POLICIES = [
    "full", "window", "streaming_llm", "h2o", "buzz", "buzz_paper", "cascading",
    "streaming_llm+in_cache", "buzz+in_cache", "cascading+in_cache", "cascading+max",
]  # fmt: skip


def base(policy: str) -> str:
    return policy.removesuffix("+in_cache").removesuffix("+max")


def params(policy: str, budget: int) -> dict:
    extra = {"positions": "in_cache"} if policy.endswith("+in_cache") else {}
    extra |= {"head_reduction": "max"} if policy.endswith("+max") else {}
    policy = base(policy)
    if policy == "full":
        return {}
    if policy == "buzz_paper":  # its fixed sizes, scaled down so rounds happen within the test
        return {"sink": 2, "window": budget // 4, "threshold": budget // 2, "stride": 3, **extra}
    return {"budget": budget, **extra}


def decode(model, policy: str, graph: bool, steps: int = 24, prompt: int = 40, budget: int = 16) -> torch.Tensor:
    """Teacher-forced decode logits (the same tokens whatever the path, so a small difference cannot snowball)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, prompt + steps), device="cuda")
    cache = make_cache(base(policy), model, **params(policy, budget))
    kw = cache_kwarg(model)
    out = []
    with torch.inference_mode():
        model(input_ids=ids[:, :prompt], **{kw: cache})
        if policy == "full":
            cache.reserve(steps)
        step = GraphDecodeStep(model, cache, kw)
        pos = torch.full((3, 1), prompt, device="cuda")
        for i in range(steps):
            tok = ids[:, prompt + i : prompt + i + 1]
            if graph:
                logits = step(tok, pos).clone()
            else:
                logits = model(input_ids=tok, position_ids=pos, **{kw: cache}).logits[:, -1]
            out.append(logits)
            pos = pos + 1
    return torch.stack(out, 1)


def fused_prefill_matches() -> float:
    """Scores after a bf16 prefill: Triton column sums vs the PyTorch blockwise path."""
    import buzz.attention as attn

    model = build_model("smollm2-135m", torch.bfloat16, "cuda")
    ids = torch.randint(0, 1000, (2, 700), device="cuda")
    scores = []
    for fused in (True, False):
        attn.USE_FUSED_PREFILL = fused
        cache = make_cache("h2o", model, budget=10_000)
        with torch.inference_mode():
            model(input_ids=ids, **{cache_kwarg(model): cache})
        scores.append(torch.stack([layer.score for layer in cache.layers]))
    attn.USE_FUSED_PREFILL = True
    return ((scores[0] - scores[1]).abs().max() / scores[1].abs().max()).item()


if __name__ == "__main__":
    model = build_model("tiny", torch.float32, "cuda")
    names = sys.argv[1:] or POLICIES
    bad = 0
    for name in names:
        err = (decode(model, name, True) - decode(model, name, False)).abs().max().item()
        print(f"graph vs eager, {name}: max |diff| = {err:.2e}")
        bad += err > 1e-4
    import buzz.cache as core

    for name in [n for n in names if n.startswith(("buzz", "cascading"))]:  # compiled decode selection vs eager
        runs = []
        for compiled in (True, False):
            core.COMPILE_DECODE_SELECTION = compiled
            runs.append(decode(model, name, graph=True))
        core.COMPILE_DECODE_SELECTION = True
        err = (runs[0] - runs[1]).abs().max().item()
        print(f"compiled vs eager selection, {name}: max |diff| = {err:.2e}")
        bad += err > 1e-4
    import buzz.attention as attn

    half = build_model("smollm2-135m", torch.bfloat16, "cuda")
    for name in names:
        runs = []
        for fused in (True, False):
            attn.USE_FUSED_DECODE = fused
            runs.append(decode(half, name, graph=True, prompt=600, budget=200))
        attn.USE_FUSED_DECODE = True
        rel = ((runs[0] - runs[1]).abs().max() / runs[1].abs().max()).item()
        print(f"fused decode vs PyTorch path (bf16), {name}: max relative diff = {rel:.2e}")
        bad += rel > 2e-2
    rel = fused_prefill_matches()
    print(f"fused prefill scores vs PyTorch path: max relative diff = {rel:.2e}")
    bad += rel > 2e-2
    sys.exit(1 if bad else 0)
