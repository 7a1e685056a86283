"""Lost-in-the-Middle multi-document QA: NQ-Open with 10 documents, the gold one at `gold_position`.

Online users read the real files from the lost-in-the-middle repository. Offline only synthetic 10-document files
exist (real questions and gold passages, distractors drawn from other questions' gold passages): results on them
are marked synthetic and are not the real benchmark. A real file placed in the data directory is preferred.
"""

from __future__ import annotations

from pathlib import Path

from buzz.metrics import best_subspan_em
from buzz.tasks.base import DataSource, Sample, Task, read_jsonl

GOLD_POSITIONS = (0, 4, 9)
LITM_URL = (
    "https://github.com/nelson-liu/lost-in-the-middle/raw/main/qa_data/10_total_documents/"
    "nq-open-10_total_documents_gold_at_{gold}.jsonl.gz"
)
# The benchmark's own prompt (lost-in-the-middle, qa.prompt).
PROMPT = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant).\n\n{search_results}\n\nQuestion: {question}\nAnswer:"
)


class QA10(Task):
    name = "qa10"
    defaults = {
        "name": "qa10", "kind": "generate", "gold_position": 4, "hub_url": LITM_URL,
        "offline_file": "nq_open_10docs/nq-open-10_total_documents_gold_at_{gold}.jsonl.gz",
        "offline_synthetic_file": (
            "nq_open_10docs/synthetic_fallback/nq-open-10_total_documents_gold_at_{gold}.SYNTHETIC.jsonl.gz"
        ),
        "prompt": PROMPT, "use_chat_template": True, "max_new_tokens": 32, "max_prompt_tokens": None,
    }  # fmt: skip

    def check(self) -> None:
        self.positive_int("max_new_tokens")
        self.positive_int("max_prompt_tokens", optional=True)
        if self.cfg["gold_position"] not in GOLD_POSITIONS:
            raise ValueError(
                f"task.gold_position={self.cfg['gold_position']} is invalid; allowed: "
                + ", ".join(map(str, GOLD_POSITIONS))
            )

    @property
    def metric_info(self) -> dict[str, str]:
        return {"accuracy": "best-subspan exact match (normalised gold answer inside the normalised first line)"}

    def load(self, data_dir: Path | None, limit: int | None) -> tuple[list[Sample], DataSource]:
        gold = self.cfg["gold_position"]
        if data_dir is None:
            from datasets import load_dataset

            url = self.cfg["hub_url"].format(gold=gold)
            rows = list(load_dataset("json", data_files=url, split="train"))
            source = DataSource("hub", url, "nq-open validation (2655 questions)", False, "real LITM 10-document file")
        else:
            real = Path(data_dir) / self.cfg["offline_file"].format(gold=gold)
            synthetic = Path(data_dir) / self.cfg["offline_synthetic_file"].format(gold=gold)
            if real.exists():
                rows, source = read_jsonl(real), DataSource("offline", str(real), "nq-open", False, "real LITM file")
            elif synthetic.exists():
                rows = read_jsonl(synthetic)
                source = DataSource("offline", str(synthetic), "nq-open", True,
                                    "SYNTHETIC distractors (other questions' gold passages): not the real LITM "
                                    "benchmark; real questions and gold passages")  # fmt: skip
            else:
                raise ValueError(f"task=qa10: neither {real} nor {synthetic} exists; set data_dir")
        samples = []
        for i, row in enumerate(rows):
            samples.append(Sample(f"qa10-{i:04d}", row["question"], list(row["answers"]),
                                  {"ctxs": row["ctxs"], "gold_position": gold}))  # fmt: skip
            if limit is not None and len(samples) >= limit:
                break
        return samples, source

    def build_prompt(self, sample: Sample, tokenizer=None) -> str:
        """The benchmark prompt; with a tokenizer, each document is cut to `max_prompt_tokens` tokens."""
        cut = (lambda text: self.truncate(text, tokenizer)) if tokenizer is not None else (lambda text: text)
        docs = "\n".join(
            f"Document [{i + 1}](Title: {c['title']}) {cut(c['text'])}" for i, c in enumerate(sample.meta["ctxs"])
        )
        return self.cfg["prompt"].format(search_results=docs, question=sample.text)

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        return self.chat_or_plain(self.build_prompt(sample, tokenizer), tokenizer)

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        return {"accuracy": best_subspan_em(prediction, sample.reference)}
