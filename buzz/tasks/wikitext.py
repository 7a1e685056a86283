"""Wikitext-2 perplexity measured through the evicting cache.

The test split's rows are joined into one text (rows keep their own trailing newline, as on the Hub), tokenized
once, and cut into consecutive streams of `stream_tokens`. The runner feeds each stream's first `prefix_tokens` in
one forward, then the rest one token at a time, so the cache evicts while the text is scored: perplexity is over
the `stream_tokens - prefix_tokens` tokens after the prefix. A fractional cache budget is a fraction of
`stream_tokens` (the whole text the cache sees), not of the prefix.

With `bucket_tokens` the records also carry perplexity per position bucket: bucket k holds the scored tokens at
stream positions [k * bucket_tokens, (k + 1) * bucket_tokens), i.e. those predicted after that many tokens were fed
(the first bucket starts after the prefix). `wikitext_stream` is the long-stream setting built on it: one stream of
32768 tokens in buckets of 4096, which runs past a model's trained context (8192 for SmolLM2) and shows where a full
cache with absolute positions breaks and which policies stay flat. Its budgets are meant as tokens (an int, e.g.
1024): a fraction would be of the whole 32k stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from buzz.metrics import perplexity
from buzz.tasks.base import DataSource, Sample, Task


class Wikitext(Task):
    name = "wikitext"
    kind = "perplexity"
    # `bucket_tokens` is not in configs/task/wikitext.yaml (a new key there would rename every existing run
    # directory): set it with `+task.bucket_tokens=N`, or use task=wikitext_stream.
    defaults = {
        "name": "wikitext", "kind": "perplexity", "hub_path": "Salesforce/wikitext", "hub_name": "wikitext-2-raw-v1",
        "split": "test", "offline_file": "wikitext/wikitext-2-raw-v1.test.jsonl", "stream_tokens": 1024,
        "prefix_tokens": 128, "max_tokens": 16384, "bucket_tokens": None,
    }  # fmt: skip

    def check(self) -> None:
        for key in ("stream_tokens", "prefix_tokens", "max_tokens"):
            self.positive_int(key)
        self.positive_int("bucket_tokens", optional=True)
        if self.cfg["prefix_tokens"] >= self.cfg["stream_tokens"]:
            raise ValueError(
                f"task.prefix_tokens={self.cfg['prefix_tokens']} is invalid; allowed: less than task.stream_tokens"
            )
        self._text: str | None = None
        self._ids: tuple[int, list[int]] | None = None

    @property
    def stream_tokens(self) -> int:
        return self.cfg["stream_tokens"]

    @property
    def prefix_tokens(self) -> int:
        return self.cfg["prefix_tokens"]

    @property
    def bucket_tokens(self) -> int | None:
        return self.cfg["bucket_tokens"]

    @property
    def metric_info(self) -> dict[str, str]:
        if self.bucket_tokens is None:
            return {}
        return {
            "bucket_ppl": f"perplexity per position bucket of {self.bucket_tokens} stream tokens (bucket k: the tokens "
            f"at positions [k*{self.bucket_tokens}, (k+1)*{self.bucket_tokens}) after the prefix)",
            "bucket_start": "first scored stream position of each bucket",
        }

    def load(self, data_dir: Path | None, limit: int | None) -> tuple[list[Sample], DataSource]:
        c = self.cfg
        rows, source = self.load_rows(data_dir, "the full real wikitext-2-raw-v1 test split")
        self._text = "".join(r["text"] for r in rows)
        n = c["max_tokens"] // c["stream_tokens"]
        if limit is not None:
            n = min(n, limit)
        samples = [Sample(f"wikitext-{i:04d}", f"tokens [{i * self.stream_tokens}, {(i + 1) * self.stream_tokens})",
                          None, {"stream": i}) for i in range(n)]  # fmt: skip
        source.note += f"; {n} streams of {c['stream_tokens']} tokens, first {c['prefix_tokens']} as prefix"
        if self.bucket_tokens is not None:
            source.note += f", perplexity per {self.bucket_tokens}-token position bucket"
        return samples, source

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        if self._ids is None or self._ids[0] != id(tokenizer):
            self._ids = (id(tokenizer), tokenizer(self._text, add_special_tokens=False)["input_ids"])
        ids = self._ids[1]
        i, n = sample.meta["stream"], self.stream_tokens
        if (i + 1) * n > len(ids):
            raise ValueError(f"task={self.name}: the text has {len(ids)} tokens, fewer than stream {i} needs")
        return ids[i * n : (i + 1) * n]

    def score_stream(self, nll_sum: float, n_tokens: int, buckets: dict[str, list] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"nll_sum": nll_sum, "n_tokens": n_tokens, "ppl": perplexity(nll_sum, n_tokens)}
        if buckets is not None:
            out |= buckets
            out["bucket_ppl"] = [perplexity(s, k) for s, k in zip(buckets["bucket_nll_sum"], buckets["bucket_tokens"])]
        return out

    def aggregate(self, per_sample: list[dict[str, Any]]) -> dict[str, Any]:
        nll = sum(m["nll_sum"] for m in per_sample)
        tokens = sum(m["n_tokens"] for m in per_sample)
        out: dict[str, Any] = {"ppl": perplexity(nll, tokens), "tokens_evaluated": tokens, "n": len(per_sample)}
        starts = [m.get("bucket_start") for m in per_sample]
        if per_sample and starts[0] is not None and all(s == starts[0] for s in starts):
            # Token-weighted over the streams, bucket by bucket (every stream has the same buckets).
            sums = [sum(col) for col in zip(*(m["bucket_nll_sum"] for m in per_sample))]
            counts = [sum(col) for col in zip(*(m["bucket_tokens"] for m in per_sample))]
            out |= {"bucket_start": starts[0], "bucket_ppl": [perplexity(s, k) for s, k in zip(sums, counts)]}
        return out


class WikitextStream(Wikitext):
    """One long Wikitext-2 stream with perplexity per position bucket (configs/task/wikitext_stream.yaml)."""

    name = "wikitext_stream"
    defaults = Wikitext.defaults | {
        "name": "wikitext_stream", "stream_tokens": 32768, "prefix_tokens": 64, "max_tokens": 32768,
        "bucket_tokens": 4096,
    }  # fmt: skip
