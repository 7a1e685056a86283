"""Passkey retrieval (Mohtashami & Jaggi, 2023; the long-context test of the Cascading KV cache paper): a 5-digit
key hidden at a given depth of repeated filler text, then the question. The data is SYNTHETIC: prompts are
generated from a seed (nothing is downloaded), and every record and the data source say so.

The prompt is the standard one: the task description, filler ("The grass is green. The sky is blue. ..."), the key
line "The pass key is NNNNN. Remember it. NNNNN is the pass key." after `depth` of the filler, more filler, and
"What is the pass key? The pass key is". Each context length is in tokens of the model's tokenizer: the filler is
sized sentence by sentence (and re-measured) so the encoded prompt lands within a few tokens of it. Accuracy is 1
when the key appears in the generated answer as a whole number (not inside a longer run of digits).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from buzz.tasks.base import DataSource, Sample, Task

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MIN_LENGTH = 64  # tokens: room for the description, the key line and the question


def filler(n: int, start: int = 0) -> str:
    """`n` filler sentences, continuing the cycle at sentence `start`."""
    return " ".join(FILLER[(start + i) % len(FILLER)] for i in range(n))


def build_prompt(key: str, before: int, after: int) -> str:
    """The prompt text with `before` filler sentences ahead of the key line and `after` behind it."""
    parts = [INTRO, filler(before), KEY_LINE.format(key=key), filler(after, before), QUESTION]
    return "\n".join(p for p in parts if p)


class Passkey(Task):
    name = "passkey"
    defaults = {
        "name": "passkey", "kind": "generate", "lengths": [2048, 4096, 8192, 16384, 32768],
        "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples": 2, "seed": 0, "max_new_tokens": 8,
        "use_chat_template": False,
    }  # fmt: skip

    def check(self) -> None:
        self.positive_int("max_new_tokens")
        self.positive_int("samples")
        lengths, depths, seed = self.cfg["lengths"], self.cfg["depths"], self.cfg["seed"]
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            lengths = self.cfg["lengths"] = [lengths]
        if (
            not isinstance(lengths, list) or not lengths
            or any(isinstance(n, bool) or not isinstance(n, int) or n < MIN_LENGTH for n in lengths)
        ):  # fmt: skip
            raise ValueError(f"task.lengths={lengths!r} is invalid; allowed: a list of ints >= {MIN_LENGTH} (tokens)")
        if isinstance(depths, (int, float)) and not isinstance(depths, bool):
            depths = self.cfg["depths"] = [depths]
        if (
            not isinstance(depths, list) or not depths
            or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths)
        ):  # fmt: skip
            raise ValueError(f"task.depths={depths!r} is invalid; allowed: a list of fractions in [0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"task.seed={seed!r} is invalid; allowed: an int")
        self._rate: tuple[int, float] | None = None

    @property
    def metric_info(self) -> dict[str, str]:
        return {
            "accuracy": "1 if the 5-digit pass key appears as a whole number in the generated answer, else 0",
            "accuracy@<tokens>": "accuracy over the prompts of one context length",
            "accuracy@depth<d>": "accuracy over the prompts with the key at one depth of the filler",
            "data": "SYNTHETIC: prompts generated from task.seed, not a downloaded data set",
        }

    def load(self, data_dir: Path | None, limit: int | None) -> tuple[list[Sample], DataSource]:
        c = self.cfg
        samples = []
        for length in c["lengths"]:
            for depth in c["depths"]:
                for i in range(c["samples"]):
                    rng = random.Random(f"passkey/{c['seed']}/{length}/{float(depth)}/{i}")
                    key = str(rng.randint(10000, 99999))
                    reference = {"passkey": key, "context_tokens": length, "depth": float(depth), "synthetic": True}
                    samples.append(Sample(f"passkey-{length}-d{float(depth):.3f}-{i}",
                                          f"SYNTHETIC passkey prompt: {length} tokens, key at depth {depth}",
                                          reference, {"length": length, "depth": float(depth)}))  # fmt: skip
                    if limit is not None and len(samples) >= limit:
                        return samples, self._source(len(samples))
        return samples, self._source(len(samples))

    def _source(self, n: int) -> DataSource:
        c = self.cfg
        where = f"generated by buzz.tasks.passkey (seed={c['seed']}, lengths={c['lengths']}, depths={c['depths']})"
        note = (f"SYNTHETIC passkey retrieval prompts, generated from a seed with no download; {n} prompts, "
                f"{c['samples']} per (length, depth)")  # fmt: skip
        return DataSource("generated", where, "synthetic", True, note)

    # prompts ---------------------------------------------------------------------------------------------------
    def _tokens(self, text: str, tokenizer) -> list[int]:
        return self.chat_or_plain(text, tokenizer)

    def _sentence_rate(self, tokenizer) -> float:
        """Tokens per filler sentence for this tokenizer (measured once)."""
        if self._rate is None or self._rate[0] != id(tokenizer):
            n = 20 * len(FILLER)
            rate = len(tokenizer(filler(n), add_special_tokens=False)["input_ids"]) / n
            self._rate = (id(tokenizer), rate)
        return self._rate[1]

    def fit(self, sample: Sample, tokenizer) -> tuple[list[int], int, int]:
        """(token ids, filler sentences before the key, after it): the prompt closest to the sample's length."""
        key, length, depth = sample.reference["passkey"], sample.meta["length"], sample.meta["depth"]
        rate = self._sentence_rate(tokenizer)

        def make(n: int) -> tuple[list[int], int, int]:
            before = round(n * depth)
            return self._tokens(build_prompt(key, before, n - before), tokenizer), before, n - before

        fixed = len(self._tokens(build_prompt(key, 0, 0), tokenizer))
        n = max(0, round((length - fixed) / rate))
        best = make(n)
        for _ in range(4):  # re-measure: tokens do not add up exactly across sentence joins
            miss = length - len(best[0])
            if abs(miss) < rate:
                break
            n = max(0, n + round(miss / rate))
            cand = make(n)
            if abs(length - len(cand[0])) >= abs(miss):
                break
            best = cand
        return best

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        return self.fit(sample, tokenizer)[0]

    def record_fields(self, sample: Sample) -> dict[str, Any]:
        # The requested context length (the prompt lands within a few tokens of it) and the key's depth: the
        # passkey table's axes. The record's `reference` holds them too, but exported records drop references.
        return {"length": sample.meta["length"], "depth": sample.meta["depth"]}

    # scoring ---------------------------------------------------------------------------------------------------
    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        ref = sample.reference
        hit = float(re.search(rf"(?<!\d){ref['passkey']}(?!\d)", prediction) is not None)
        return {"accuracy": hit, f"accuracy@{ref['context_tokens']}": hit, f"accuracy@depth{ref['depth']:g}": hit}

    def aggregate(self, per_sample: list[dict[str, float]]) -> dict[str, Any]:
        keys = list(dict.fromkeys(k for m in per_sample for k in m))
        out: dict[str, Any] = {}
        for k in keys:
            vals = [m[k] for m in per_sample if k in m]
            out[k] = sum(vals) / len(vals)
        return out | {"n": len(per_sample)}
