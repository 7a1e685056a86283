"""Zero-shot summarization (XSUM, CNN/DailyMail), greedy decoding, ROUGE F1."""

from __future__ import annotations

from pathlib import Path

from buzz.metrics import ROUGE_DESCRIPTIONS, ROUGE_IMPLS, rouge
from buzz.tasks.base import DataSource, Sample, Task

COMMON = {
    "kind": "generate", "hub_path": None, "hub_name": None, "split": "test", "offline_file": None,
    "document_field": None, "summary_field": None, "id_field": "id", "prompt": None, "use_chat_template": True,
    "max_new_tokens": 64, "max_prompt_tokens": 3072, "rouge": "rouge_score",
}  # fmt: skip


class Summarization(Task):
    defaults = {"name": None, **COMMON}
    note = ""

    def check(self) -> None:
        self.positive_int("max_new_tokens")
        self.positive_int("max_prompt_tokens", optional=True)
        if self.cfg["rouge"] not in ROUGE_IMPLS:
            raise ValueError(f"task.rouge={self.cfg['rouge']} is invalid; allowed: {', '.join(ROUGE_IMPLS)}")
        if "{document}" not in str(self.cfg["prompt"]):
            raise ValueError("task.prompt is invalid; allowed: a template containing {document}")

    @property
    def metric_info(self) -> dict[str, str]:
        return {"rouge": self.cfg["rouge"], "rouge_description": ROUGE_DESCRIPTIONS[self.cfg["rouge"]]}

    def load(self, data_dir: Path | None, limit: int | None) -> tuple[list[Sample], DataSource]:
        c = self.cfg
        rows, source = self.load_rows(data_dir, self.note)
        samples = []
        for row in rows:
            doc = (row.get(c["document_field"]) or "").strip()
            if not doc:
                self.skipped_empty += 1
                continue
            samples.append(Sample(str(row[c["id_field"]]), doc, row[c["summary_field"]]))
            if limit is not None and len(samples) >= limit:
                break
        if self.skipped_empty:
            source.note += f" ({self.skipped_empty} empty documents skipped)"
        return samples, source

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        return self.chat_or_plain(self.cfg["prompt"].format(document=self.truncate(sample.text, tokenizer)), tokenizer)

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        return rouge(prediction.strip(), sample.reference, self.cfg["rouge"])


class XSum(Summarization):
    name = "xsum"
    note = "real XSUM test rows: an order-preserving ~1-in-11 subsample of the HF test split (see SOURCE.md)"


class CNNDailyMail(Summarization):
    name = "cnn_dm"
    note = "real CNN/DailyMail 3.0.0 test rows test[0:105] (see SOURCE.md)"
