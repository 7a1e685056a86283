"""Turn decode-benchmark outputs (`python -m buzz.bench`) into the committed report in results/perf/.

    python -m buzz.perf_report --grid a.points.jsonl b.json ... --complexity c.points.jsonl --out results/perf

Writes `<gpu>.json` (every grid point, merged), `summary.json` (the headline point), `<gpu>.md` (the table),
`decode_vs_context.png`, `memory_vs_context.png`, and from streaming runs `complexity.json`, `complexity.md` and
`complexity.png`. Reads only files; runs nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from buzz.bench import markdown_table, summarize
from buzz.records import write_json_atomic

KEY = ("prompt", "batch", "policy", "budget", "mode")


def read_points(paths: list[Path]) -> tuple[list[dict], dict[str, Any]]:
    """Points from bench JSON results or their per-point JSONL files; a later file's point replaces an earlier one
    with the same (prompt, batch, policy, budget, mode)."""
    meta: dict[str, Any] = {}
    points: dict[tuple, dict] = {}
    for path in paths:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            data = json.loads(path.read_text())
            rows = data["points"]
            meta = meta or {k: v for k, v in data.items() if k != "points"}
        for row in rows:
            points[tuple(row[k] for k in KEY)] = row
    order = {"full": 0, "window": 1, "streaming_llm": 2, "h2o": 3, "buzz": 4, "buzz_paper": 5, "cascading": 6}
    ordered = sorted(points.values(), key=lambda p: (p["prompt"], p["batch"], order.get(p["policy"], 9),
                                                     p["budget"] or 0, p["mode"]))  # fmt: skip
    return ordered, meta


def plot_grid(points: list[dict], out: Path, batch: int = 4, budget: float = 0.2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, name in (("decode_ms", "decode ms/step", "decode_vs_context.png"),
                              ("peak_bytes", "peak allocated GiB", "memory_vs_context.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for policy in dict.fromkeys(p["policy"] for p in points):
            for mode in ("graph", "eager"):
                sel = [p for p in points if p["policy"] == policy and p["batch"] == batch and p["mode"] == mode
                       and p["budget"] in (None, budget)]  # fmt: skip
                ok = [p for p in sel if p["status"] == "ok"]
                if not ok:
                    continue
                scale = 2**-30 if key == "peak_bytes" else 1
                label = policy + (" (eager DynamicCache)" if mode == "eager" else "")
                line = ax.plot([p["prompt"] for p in ok], [p[key] * scale for p in ok], marker="o", label=label)
                for p in sel:
                    if p["status"] == "oom":
                        ax.annotate("OOM", (p["prompt"], ax.get_ylim()[1] * 0.95), color=line[0].get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(f"batch {batch}, budget {budget} (buzz_paper: fixed sizes)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def complexity_report(paths: list[Path], out: Path) -> None:
    curves = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                curves.append(json.loads(line))
    write_json_atomic(out / "complexity.json", {"curves": curves})
    head = "| policy | batch | stored tokens: mean (min-max) | best fit (R^2 log n / n) | ms/step: mean | best fit |"
    lines = [head, "|---|---:|---|---|---:|---|"]
    for c in curves:
        f = c.get("fit") or {}
        s, d = f.get("stored_tokens"), f.get("decode_ms")
        if not s:
            lines.append(f"| {c['policy']} | {c['batch']} | {c['status']} | | | |")
            continue
        lines.append(
            f"| {c['policy']} | {c['batch']} | {s['mean']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | {s['best']} "
            f"({s['log_n']['r2']:.2f} / {s['n']['r2']:.2f}) | {d['mean']:.3f} | {d['best']} "
            f"({d['log_n']['r2']:.2f} / {d['n']['r2']:.2f}) |"
        )
    (out / "complexity.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in curves:
        if c["batch"] != 1 or not c.get("rows"):
            continue
        seen = [r["seen"] for r in c["rows"]]
        axes[0].plot(seen, [r["stored_tokens"] for r in c["rows"]], label=c["policy"])
        axes[1].plot(seen, [r["decode_ms"] for r in c["rows"]], label=c["policy"])
    axes[0].set_ylabel("stored tokens (sampled every 1k)")
    axes[1].set_ylabel("decode ms/step (median of each 1k)")
    for ax in axes:
        ax.set_xlabel("tokens seen")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("streaming 32k tokens, batch 1 (Llama-2-7B shape, 2 layers)")
    fig.tight_layout()
    fig.savefig(out / "complexity.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="*", type=Path, default=[])
    ap.add_argument("--complexity", nargs="*", type=Path, default=[])
    ap.add_argument("--out", type=Path, default=Path("results/perf"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.grid:
        points, meta = read_points(args.grid)
        result = meta | {"points": points}
        stem = result["gpu"].replace(" ", "_").lower()
        write_json_atomic(args.out / f"{stem}.json", result)
        (args.out / f"{stem}.md").write_text(markdown_table(result))
        write_json_atomic(args.out / "summary.json", summarize(result))
        plot_grid(points, args.out)
    if args.complexity:
        complexity_report(args.complexity, args.out)


if __name__ == "__main__":
    main()
