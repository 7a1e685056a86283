"""Wikitext-2 perplexity measured through the evicting cache.

The test split's rows are joined into one text (rows keep their own trailing newline, as on the Hub), tokenized
once, and cut into consecutive streams of `stream_tokens`. The runner feeds each stream's first `prefix_tokens` in
one forward, then the rest one token at a time, so the cache evicts while the text is scored: perplexity is over
the `stream_tokens - prefix_tokens` tokens after the prefix. A fractional cache budget is a fraction of
`stream_tokens` (the whole text the cache sees), not of the prefix.
"""

from __future__ import annotations

from pathlib import Path

from buzz.metrics import perplexity
from buzz.tasks.base import DataSource, Sample, Task


class Wikitext(Task):
    name = "wikitext"
    kind = "perplexity"
    defaults = {
        "name": "wikitext", "kind": "perplexity", "hub_path": "Salesforce/wikitext", "hub_name": "wikitext-2-raw-v1",
        "split": "test", "offline_file": "wikitext/wikitext-2-raw-v1.test.jsonl", "stream_tokens": 1024,
        "prefix_tokens": 128, "max_tokens": 16384,
    }  # fmt: skip

    def check(self) -> None:
        for key in ("stream_tokens", "prefix_tokens", "max_tokens"):
            self.positive_int(key)
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
        return samples, source

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        if self._ids is None or self._ids[0] != id(tokenizer):
            self._ids = (id(tokenizer), tokenizer(self._text, add_special_tokens=False)["input_ids"])
        ids = self._ids[1]
        i, n = sample.meta["stream"], self.stream_tokens
        if (i + 1) * n > len(ids):
            raise ValueError(f"task=wikitext: the text has {len(ids)} tokens, fewer than stream {i} needs")
        return ids[i * n : (i + 1) * n]

    def score_stream(self, nll_sum: float, n_tokens: int) -> dict[str, float]:
        return {"nll_sum": nll_sum, "n_tokens": n_tokens, "ppl": perplexity(nll_sum, n_tokens)}

    def aggregate(self, per_sample: list[dict[str, float]]) -> dict[str, float]:
        nll = sum(m["nll_sum"] for m in per_sample)
        tokens = sum(m["n_tokens"] for m in per_sample)
        return {"ppl": perplexity(nll, tokens), "tokens_evaluated": tokens, "n": len(per_sample)}
