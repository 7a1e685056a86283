"""Quality metrics: ROUGE (two implementations, named in results), best-subspan exact match, perplexity."""

from __future__ import annotations

import math
import re
import string
from functools import lru_cache

import torch

ROUGE_IMPLS = ("rouge_score", "rouge_pkg")
ROUGE_DESCRIPTIONS = {
    "rouge_score": "rouge-score (Google), F1, Porter stemming, rougeLsum over newline-split sentences",
    "rouge_pkg": "PyPI `rouge` 1.0.1 as in the BUZZ code: F1, case-sensitive, no stemming",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line for rougeLsum. A regex splitter: nltk's punkt data cannot be downloaded offline."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@lru_cache(maxsize=1)
def _rouge_score_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)


def rouge(prediction: str, reference: str, impl: str = "rouge_score") -> dict[str, float]:
    """ROUGE-1/2/L (and Lsum for rouge_score) F1 of one prediction against one reference."""
    if impl == "rouge_score":
        scores = _rouge_score_scorer().score(split_sentences(reference), split_sentences(prediction))
        return {k: v.fmeasure for k, v in scores.items()}
    if impl == "rouge_pkg":
        from rouge import Rouge

        if not prediction.strip() or not reference.strip():
            return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        try:
            s = Rouge().get_scores(prediction, reference)[0]
        except (ValueError, RecursionError):  # the package raises on hypotheses made only of punctuation
            return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        return {"rouge1": s["rouge-1"]["f"], "rouge2": s["rouge-2"]["f"], "rougeL": s["rouge-l"]["f"]}
    raise ValueError(f"rouge implementation {impl!r} is invalid; allowed: {', '.join(ROUGE_IMPLS)}")


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def best_subspan_em(prediction: str, answers: list[str]) -> float:
    """1.0 when a normalised gold answer occurs in the normalised prediction (cut at its first newline)."""
    first_line = prediction.strip().split("\n")[0]
    pred = normalize_answer(first_line)
    return float(any(normalize_answer(a) and normalize_answer(a) in pred for a in answers))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of `targets` under `logits` (..., vocab), float32, summed over the last target
    axis: shape targets.shape[:-1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")
