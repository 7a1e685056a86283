"""Tasks on the offline data: rows, ids, prompts, gold positions, data-source flags, and the Hub path (faked)."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import buzz.tasks.base
import buzz.tasks.qa10
from buzz.models import load_tokenizer
from buzz.runner import resolve_data_dir
from buzz.tasks import Sample, build_task
from buzz.tasks.base import load_hub_rows
from tests.conftest import DATA_DIR, TASKS, compose_cfg, needs_data

pytestmark = needs_data


def task_cfg(name: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_cfg([f"task={name}", *overrides]).task, resolve=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.to_container(compose_cfg(["model=tiny-llama"]).model, resolve=True))


@pytest.mark.parametrize("name", TASKS)
def test_offline_rows(name):
    task = build_task(task_cfg(name))
    samples, source = task.load(DATA_DIR, 3)
    assert len(samples) == 3
    assert source.origin == "offline"
    location = Path(source.location)
    assert location.is_file() and DATA_DIR in location.parents
    assert (location.parent / "SOURCE.md").is_file() or (location.parent.parent / "SOURCE.md").is_file()
    for s in samples:
        assert s.id and s.text.strip()
    if name in ("xsum", "cnn_dm"):
        assert all(isinstance(s.reference, str) and s.reference.strip() for s in samples)
    if name == "qa10":
        assert all(isinstance(s.reference, list) and s.reference for s in samples)
    # Runs resume by sample id: ids are unique over the whole file, and `limit` takes the file's first rows.
    everything, _ = build_task(task_cfg(name)).load(DATA_DIR, None)
    assert len({s.id for s in everything}) == len(everything) > 3
    assert [s.id for s in everything[:3]] == [s.id for s in samples]


@pytest.mark.parametrize("name", ["xsum", "cnn_dm"])
def test_summarization_prompts_fit_max_prompt_tokens(name, tokenizer):
    limit = 64
    task = build_task(task_cfg(name, f"task.max_prompt_tokens={limit}"))
    whole = build_task(task_cfg(name, "task.max_prompt_tokens=null"))
    samples, _ = task.load(DATA_DIR, 5)
    template = len(task.encode(Sample("empty", "", None), tokenizer))  # the instruction and chat template alone
    longer = 0
    for s in samples:
        ids = task.encode(s, tokenizer)
        assert len(ids) <= template + limit + 2, (s.id, len(ids), template)  # +2: merges at the document's edges
        cut = task.truncate(s.text, tokenizer)
        assert s.text.startswith(cut) and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= limit
        longer += len(whole.encode(s, tokenizer)) > len(ids)
    assert longer == len(samples)  # every document here is longer than 64 tokens: truncation happened


def test_qa10_max_prompt_tokens_cuts_each_document(tokenizer):
    limit = 16
    task = build_task(task_cfg("qa10", f"task.max_prompt_tokens={limit}"))
    whole = build_task(task_cfg("qa10"))
    samples, _ = task.load(DATA_DIR, 3)
    for s in samples:
        empty_docs = copy.deepcopy(s)
        for c in empty_docs.meta["ctxs"]:
            c["text"] = ""
        template = len(task.encode(empty_docs, tokenizer))
        n = len(task.encode(s, tokenizer))
        assert n <= template + 10 * (limit + 2)
        assert n < len(whole.encode(s, tokenizer))
        prompt = task.build_prompt(s, tokenizer)
        for c in s.meta["ctxs"]:  # every document is still there, each cut to its first tokens
            assert f"(Title: {c['title']}) {task.truncate(c['text'], tokenizer)}\n" in prompt + "\n"


def test_wikitext_streams_are_consecutive_slices(tokenizer):
    task = build_task(task_cfg("wikitext", "task.stream_tokens=50", "task.prefix_tokens=10", "task.max_tokens=175"))
    samples, source = task.load(DATA_DIR, None)
    assert len(samples) == 3  # 175 // 50
    assert "3 streams of 50 tokens" in source.note
    streams = [task.encode(s, tokenizer) for s in samples]
    assert [len(x) for x in streams] == [50, 50, 50]
    text_ids = tokenizer(task._text, add_special_tokens=False)["input_ids"]
    assert sum(streams, []) == text_ids[:150]
    assert len(build_task(task_cfg("wikitext")).load(DATA_DIR, 2)[0]) == 2  # limit caps the streams


def test_wikitext_text_too_short_for_a_stream(tmp_path, tokenizer):
    (tmp_path / "wikitext").mkdir()
    rows = [{"text": " = Title = \n"}, {"text": "word " * 150 + "\n"}]
    (tmp_path / "wikitext" / "wikitext-2-raw-v1.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task(task_cfg("wikitext", "task.stream_tokens=100", "task.prefix_tokens=10", "task.max_tokens=300"))
    samples, _ = task.load(tmp_path, None)
    assert len(samples) == 3 and len(task.encode(samples[0], tokenizer)) == 100
    with pytest.raises(ValueError, match="fewer than stream 1 needs"):  # a clear error, not a short stream
        task.encode(samples[1], tokenizer)


@pytest.mark.parametrize("gold", [0, 4, 9])
def test_qa10_gold_document_at_its_position(gold, tokenizer):
    task = build_task(task_cfg("qa10", f"task.gold_position={gold}"))
    samples, source = task.load(DATA_DIR, 5)
    reference, _ = build_task(task_cfg("qa10", "task.gold_position=0")).load(DATA_DIR, 5)
    assert f"gold_at_{gold}" in source.location
    for s, ref in zip(samples, reference):
        ctxs = s.meta["ctxs"]
        assert len(ctxs) == 10
        assert [c["isgold"] for c in ctxs] == [i == gold for i in range(10)]
        assert ctxs[gold]["hasanswer"]
        # The same question and gold passage whatever the position; only the order of the documents changes.
        assert (s.id, s.text, s.reference) == (ref.id, ref.text, ref.reference)
        assert ctxs[gold]["text"] == ref.meta["ctxs"][0]["text"]
        prompt = task.build_prompt(s)
        assert f"Document [{gold + 1}](Title: {ctxs[gold]['title']}) {ctxs[gold]['text']}" in prompt
        assert prompt.count(ctxs[gold]["text"]) == 1
        assert prompt.rstrip().endswith(f"Question: {s.text}\nAnswer:")
        assert len(task.encode(s, tokenizer)) > 0


def test_data_sources_flag_synthetic_rows():
    for name in ("xsum", "cnn_dm", "wikitext"):
        _, source = build_task(task_cfg(name)).load(DATA_DIR, 1)
        assert source.synthetic is False
    _, source = build_task(task_cfg("qa10")).load(DATA_DIR, 1)
    assert not (DATA_DIR / "nq_open_10docs" / "nq-open-10_total_documents_gold_at_4.jsonl.gz").exists()
    assert source.synthetic is True
    assert "SYNTHETIC" in source.location and "SYNTHETIC" in source.note
    assert source.to_dict()["synthetic"] is True


def test_qa10_prefers_a_real_file(tmp_path):
    synthetic = DATA_DIR / "nq_open_10docs/synthetic_fallback/nq-open-10_total_documents_gold_at_9.SYNTHETIC.jsonl.gz"
    (tmp_path / "nq_open_10docs").mkdir()
    shutil.copy(synthetic, tmp_path / "nq_open_10docs" / "nq-open-10_total_documents_gold_at_9.jsonl.gz")
    samples, source = build_task(task_cfg("qa10", "task.gold_position=9")).load(tmp_path, 2)
    assert len(samples) == 2 and source.synthetic is False and "SYNTHETIC" not in source.location
    with pytest.raises(ValueError, match="gold_at_4"):  # neither file for position 4 here
        build_task(task_cfg("qa10")).load(tmp_path, 2)


def test_summarization_skips_empty_documents(tmp_path):
    (tmp_path / "xsum").mkdir()
    rows = [{"id": "a", "document": "  ", "summary": "x"}, {"id": "b", "document": "Text.", "summary": "y"}]
    (tmp_path / "xsum" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, source = build_task(task_cfg("xsum")).load(tmp_path, None)
    assert [s.id for s in samples] == ["b"]
    assert "1 empty documents skipped" in source.note
    with pytest.raises(ValueError, match="cnn_dailymail/test.jsonl not found"):
        build_task(task_cfg("cnn_dm")).load(tmp_path, None)


# --------------------------------------------------------------------------------------------- the Hub (faked)


def test_data_dir_values(monkeypatch, tmp_path):
    monkeypatch.delenv("KVBENCH_DATA_DIR", raising=False)
    assert resolve_data_dir("hub") is None
    assert resolve_data_dir(None) is None
    assert resolve_data_dir("auto") == DATA_DIR
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("auto") == tmp_path


@pytest.fixture
def no_offline_reads(monkeypatch):
    def boom(path):
        raise AssertionError(f"offline file read on the hub path: {path}")

    for module in (buzz.tasks.base, buzz.tasks.qa10):
        monkeypatch.setattr(module, "read_jsonl", boom)


@pytest.mark.parametrize("name", ["xsum", "cnn_dm"])
def test_hub_path_summarization(name, monkeypatch, no_offline_reads):
    calls = []
    cfg = task_cfg(name)
    rows = [{cfg["id_field"]: i, cfg["document_field"]: f"doc {i}", cfg["summary_field"]: f"sum {i}"} for i in range(5)]

    def fake(path, hub_name, split):
        calls.append((path, hub_name, split))
        return rows

    monkeypatch.setattr(buzz.tasks.base, "load_hub_rows", fake)
    samples, source = build_task(cfg).load(resolve_data_dir("hub"), 2)
    assert calls == [(cfg["hub_path"], cfg["hub_name"], "test")]
    assert [(s.id, s.text, s.reference) for s in samples] == [("0", "doc 0", "sum 0"), ("1", "doc 1", "sum 1")]
    assert source.origin == "hub" and cfg["hub_path"] in source.location and source.synthetic is False


def test_hub_path_wikitext(monkeypatch, no_offline_reads, tokenizer):
    calls = []

    def fake(path, hub_name, split):
        calls.append((path, hub_name, split))
        return [{"text": " = Title = \n"}, {"text": "word " * 300 + "\n"}]

    monkeypatch.setattr(buzz.tasks.base, "load_hub_rows", fake)
    task = build_task(task_cfg("wikitext", "task.stream_tokens=100", "task.prefix_tokens=10", "task.max_tokens=200"))
    samples, source = task.load(resolve_data_dir("hub"), None)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert source.origin == "hub" and len(samples) == 2
    assert len(task.encode(samples[1], tokenizer)) == 100


@pytest.mark.parametrize("gold", [0, 9])
def test_hub_path_qa10(gold, monkeypatch, no_offline_reads):
    import datasets

    calls = []
    row = {"question": "q?", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}] * 10}

    def fake(kind, data_files=None, split=None):
        calls.append((kind, data_files, split))
        return [row] * 3

    monkeypatch.setattr(datasets, "load_dataset", fake)
    samples, source = build_task(task_cfg("qa10", f"task.gold_position={gold}")).load(None, 2)
    url = f"lost-in-the-middle/raw/main/qa_data/10_total_documents/nq-open-10_total_documents_gold_at_{gold}.jsonl.gz"
    assert len(calls) == 1 and calls[0][0] == "json" and calls[0][1].endswith(url) and calls[0][2] == "train"
    assert len(samples) == 2 and source.origin == "hub" and source.synthetic is False


def test_load_hub_rows_calls_datasets(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or iter([{"x": 1}]))
    assert load_hub_rows("EdinburghNLP/xsum", None, "test") == [{"x": 1}]
    assert calls == [(("EdinburghNLP/xsum", None), {"split": "test"})]


def test_gzip_rows_are_read(tmp_path):
    from buzz.tasks.base import read_jsonl

    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n\n{"a": "é"}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}]
