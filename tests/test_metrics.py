"""Metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from buzz.metrics import best_subspan_em, normalize_answer, perplexity, rouge, split_sentences, token_nll
from buzz.tasks import build_task

# "the cat sat" vs "the cat ran": unigrams {the, cat} shared of 3 each -> P = R = F1 = 2/3; bigrams {the cat} shared
# of 2 each -> 1/2; longest common subsequence "the cat" -> 2/3.
CAT = {"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3}


@pytest.mark.parametrize("impl", ["rouge_score", "rouge_pkg"])
def test_rouge_by_hand(impl):
    scores = rouge("the cat sat", "the cat ran", impl)
    for key, value in CAT.items():
        assert scores[key] == pytest.approx(value, abs=1e-6)
    assert rouge("the cat sat", "the cat sat", impl)["rouge1"] == pytest.approx(1.0, abs=1e-6)
    assert rouge("dogs bark", "the cat sat", impl)["rouge1"] == 0.0


def test_rouge_score_unequal_lengths():
    # 2 of the prediction's 2 unigrams match, 2 of the reference's 4: P = 1, R = 1/2, F1 = 2/3.
    # Bigram "the cat" of 1 and of 3: P = 1, R = 1/3, F1 = 1/2.
    s = rouge("the cat", "the cat sat down")
    assert s["rouge1"] == pytest.approx(2 / 3)
    assert s["rouge2"] == pytest.approx(1 / 2)
    assert s["rougeL"] == pytest.approx(2 / 3)


def test_rouge_score_stems_and_ignores_case_but_rouge_pkg_does_not():
    # Porter stemming: cats -> cat, sits -> sit (sat stays): the same counts as the cat example.
    stemmed = rouge("The cats sat", "the cat sits")
    assert stemmed["rouge1"] == pytest.approx(2 / 3) and stemmed["rouge2"] == pytest.approx(1 / 2)
    # The BUZZ code's scorer is case-sensitive: "The" != "the", so "sat" is the one shared unigram of "The cat sat"
    # and "the dog sat" (F1 = 1/3) and no bigram is shared; rouge-score lowercases: {the, sat} -> 2/3.
    raw = rouge("The cat sat", "the dog sat", "rouge_pkg")
    assert raw["rouge1"] == pytest.approx(1 / 3, abs=1e-6) and raw["rouge2"] == pytest.approx(0.0, abs=1e-6)
    assert rouge("The cat sat", "the dog sat")["rouge1"] == pytest.approx(2 / 3)


def test_rouge_lsum_splits_sentences():
    pred, ref = "the cat sat. the dog ran.", "the dog ran. the cat sat."
    s = rouge(pred, ref)
    # Over the whole text the longest common subsequence is 3 of 6 tokens: rougeL = 1/2.
    assert s["rougeL"] == pytest.approx(1 / 2)
    # Summary-level: each reference sentence is fully covered by some predicted sentence: rougeLsum = 1.
    assert s["rougeLsum"] == pytest.approx(1.0)
    # Bigrams: 5 each, shared: the cat, cat sat, the dog, dog ran -> 4/5.
    assert s["rouge2"] == pytest.approx(4 / 5)


def test_split_sentences():
    assert split_sentences("  One here. Two there!  Three?\nFour ") == "One here.\nTwo there!\nThree?\nFour"
    assert split_sentences("no end mark") == "no end mark"
    assert split_sentences("") == ""


@pytest.mark.parametrize("prediction", ["", "   ", "...", "!?"])
def test_rouge_degenerate_predictions_score_zero(prediction):
    for impl in ("rouge_score", "rouge_pkg"):
        assert all(v == 0 for v in rouge(prediction, "the cat sat", impl).values())


def test_rouge_unknown_impl():
    with pytest.raises(ValueError, match="allowed: rouge_score, rouge_pkg"):
        rouge("a", "b", "bleu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, Brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("  \tA\n", ""),
        ("Paris—France", "paris—france"),  # only ASCII punctuation is removed
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Paris", ["paris"], 1.0),
        ("The answer is Paris, France.", ["Paris"], 1.0),
        ("It is the Eiffel tower", ["Eiffel Tower", "nope"], 1.0),
        ("London", ["Paris", "Lyon"], 0.0),
        ("London\nParis", ["Paris"], 0.0),  # only the first line counts
        ("\n  Paris\nLondon", ["Paris"], 1.0),  # ... after stripping leading blank lines
        ("anything", ["the"], 0.0),  # an answer that normalises to nothing never matches
        ("anything", [], 0.0),
        ("Barack Obama", ["Barack H. Obama"], 0.0),
        ("in 1969.", ["1969"], 1.0),
    ],
)
def test_best_subspan_em(prediction, answers, expected):
    assert best_subspan_em(prediction, answers) == expected


def test_perplexity_of_uniform_model_is_vocab_size():
    vocab, n = 97, 13
    logits = torch.zeros(2, n, vocab)
    targets = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))
    nll = token_nll(logits, targets)
    assert nll.shape == (2,)
    assert nll.tolist() == pytest.approx([n * math.log(vocab)] * 2)
    assert perplexity(float(nll[0]), n) == pytest.approx(vocab)


def test_token_nll_by_hand():
    # log-softmax of [log 1, log 3] = [log 1/4, log 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    assert float(token_nll(logits, torch.tensor([[0, 1]]))) == pytest.approx(-math.log(1 / 4) - math.log(3 / 4))
    # bfloat16 logits are scored in float32
    assert token_nll(logits.bfloat16(), torch.tensor([[1, 1]])).dtype == torch.float32
    assert math.isnan(perplexity(0.0, 0))


def test_wikitext_perplexity_is_token_weighted():
    task = build_task({"name": "wikitext"})
    a, b = task.score_stream(10.0, 10), task.score_stream(30.0, 10)
    assert a["ppl"] == pytest.approx(math.e)
    agg = task.aggregate([a, b])
    assert agg["ppl"] == pytest.approx(math.exp(40 / 20))  # not the mean of the two perplexities
    assert agg["tokens_evaluated"] == 20 and agg["n"] == 2


def test_summarization_scores_with_the_configured_rouge():
    sample = type("S", (), {"reference": "the cat ran"})()
    for impl in ("rouge_score", "rouge_pkg"):
        task = build_task({"name": "xsum", "prompt": "{document}", "rouge": impl})
        scores = task.score(sample, "  the cat sat \n")
        assert scores["rouge1"] == pytest.approx(2 / 3, abs=1e-6)
        assert task.metric_info["rouge"] == impl
