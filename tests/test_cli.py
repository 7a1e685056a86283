"""Config composition and the preflight: every shipped option validates, and every bad value is refused up front with
a one-line error that names it and the allowed values."""

from __future__ import annotations

import subprocess

import pytest
from omegaconf import OmegaConf

import buzz.models
import buzz.runner
from buzz.cli import GROUPS, group_options, preflight
from buzz.runner import ConfigError, validate
from tests.conftest import CONFIG_DIR, PYTHON, REPO, compose_cfg, subprocess_env

CONFIG_GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
OPTIONS = [(g, p.stem) for g in CONFIG_GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def test_config_tree_is_what_preflight_checks():
    assert {"model", "cache", "task", "logger"} <= set(CONFIG_GROUPS)
    # A group preflight does not know would get Hydra's multi-line errors instead of ConfigError.
    assert set(CONFIG_GROUPS) <= set(GROUPS)
    for group in CONFIG_GROUPS:
        assert group_options(group) == sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    # Run directories, policy lookup and task lookup all go by `name`: it must match the file's name.
    assert cfg[group].name == option
    missing = OmegaConf.missing_keys(cfg[group])
    if missing:  # an option with a required (???) value: refused in one line naming that key
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert "\n" not in str(err.value)
        assert any(key.split(".")[-1] in str(err.value) for key in missing), str(err.value)
    else:
        validate(cfg)


def test_every_cache_with_every_task_validates():
    # less's default kernels are trained for the embedded model: it is checked with that model below.
    caches = [c for c in group_options("cache") if not OmegaConf.missing_keys(compose_cfg([f"cache={c}"]).cache)]
    caches = [c for c in caches if c != "less"]
    assert {"full", "window", "h2o", "streaming_llm", "buzz", "buzz_paper"} <= set(caches)
    n = preflight(["model=tiny-llama", f"cache={','.join(caches)}", f"task={','.join(group_options('task'))}"], True)
    assert n == len(caches) * len(group_options("task"))


def test_less_default_kernels_validate_for_their_model_only():
    assert preflight(["model=smollm2-135m", "cache=less", "task=xsum"]) == 1
    with pytest.raises(ConfigError, match="trained for model smollm2-135m.*model in use is tiny-llama") as e:
        preflight(["model=tiny-llama", "cache=less", "task=xsum"])
    assert "\n" not in str(e.value)


@pytest.fixture
def no_model_loads(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded during the preflight")

    monkeypatch.setattr(buzz.models, "load_model", boom)
    monkeypatch.setattr(buzz.runner, "run", boom)


# (overrides, text the message must contain: the bad key or value, then the allowed choices)
BAD = [
    (["cache=nope"], ["cache=nope", "full", "window", "h2o"]),
    (["model=nope"], ["model=nope", "tiny-llama", "smollm2-135m"]),
    (["task=nope"], ["task=nope", "xsum", "qa10", "wikitext", "cnn_dm"]),
    (["logger=nope"], ["logger=nope", "none", "wandb"]),
    (["cache.nope=1"], ["cache.nope", "budget"]),
    (["cache=h2o", "+cache.nope=1"], ["cache.nope", "recent"]),
    (["model.nope=1"], ["model.nope", "dtype"]),
    (["task.nope=1"], ["task.nope", "max_new_tokens"]),
    (["nope=1"], ["nope", "batch_size", "limit"]),
    (["+nope=1"], ["nope", "batch_size", "limit"]),
    (["cache.budget"], ["cache.budget", "key=value"]),
    (["cache=window", "cache.budget=-1"], ["budget=-1", "int >= 1"]),
    (["cache=h2o", "cache.budget=0"], ["budget=0", "int >= 1"]),
    (["cache=streaming_llm", "cache.budget=1.5"], ["budget=1.5", "(0, 1]"]),
    (["cache.budget=-1"], ["budget=-1", "null"]),
    (["batch_size=0"], ["batch_size=0", "int >= 1"]),
    (["batch_size=2.5"], ["batch_size=2.5", "int >= 1"]),
    (["batch_size=true"], ["batch_size=True", "int >= 1"]),
    (["limit=0"], ["limit=0", "int >= 1 or null"]),
    (["seed=abc"], ["seed='abc'", "an int"]),
    (["device=tpu"], ["device='tpu'", "auto, cpu, cuda, cuda:N"]),
    (["device=cuda:x"], ["device='cuda:x'", "cuda:N"]),
    (["progress=maybe"], ["progress='maybe'", "auto, true, false"]),
    (["data_dir=/nonexistent/kvbench"], ["data_dir=/nonexistent/kvbench", "auto, hub"]),
    (["task=qa10", "task.gold_position=5"], ["gold_position=5", "0, 4, 9"]),
    (["task.gold_position=4"], ["task.gold_position", "task=xsum", "max_prompt_tokens"]),
    (["task.max_new_tokens=0"], ["max_new_tokens=0", "int >= 1"]),
    (["task=cnn_dm", "task.max_prompt_tokens=-5"], ["max_prompt_tokens=-5", "int >= 1 or null"]),
    (["task=qa10", "task.max_prompt_tokens=0"], ["max_prompt_tokens=0", "int >= 1 or null"]),
    (["task.rouge=bleu"], ["rouge=bleu", "rouge_score, rouge_pkg"]),
    (["task=wikitext", "task.prefix_tokens=2000"], ["prefix_tokens=2000", "stream_tokens"]),
    (["task=wikitext", "task.stream_tokens=0"], ["stream_tokens=0", "int >= 1"]),
    (["model.dtype=int8"], ["dtype=int8", "float32", "bfloat16"]),
    (["model.source=onnx"], ["source=onnx", "gguf, hub, tiny"]),
    (["model.attn_implementation=flash"], ["attn_implementation=flash", "sdpa"]),
    (["logger=wandb", "logger.mode=bogus"], ["mode=bogus", "online, offline, disabled"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_give_one_line_errors(overrides, expected, no_model_loads):
    with pytest.raises(ConfigError) as err:
        preflight(["model=tiny-llama", *overrides])
    msg = str(err.value)
    assert "\n" not in msg
    assert "allowed" in msg
    for text in expected:
        assert text in msg, f"{text!r} not in {msg!r}"


def test_good_sweep_counts_every_job(no_model_loads):
    n = preflight(["model=tiny-llama", "cache=window,h2o", "cache.budget=16,0.5", "task=xsum,qa10"], multirun=True)
    assert n == 8
    # Without --multirun a comma list is one value, not a sweep.
    with pytest.raises(ConfigError):
        preflight(["model=tiny-llama", "cache=window,h2o"])


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (["cache=full,window,nope"], "cache=nope"),
        (["cache=window", "cache.budget=16,0.5,-1"], "budget=-1"),
        (["batch_size=4,1,0"], "batch_size=0"),
        (["task=qa10", "task.gold_position=0,4,9,5"], "gold_position=5"),
        (["task=qa10,xsum", "task.gold_position=0"], "task=xsum"),
    ],
)
def test_sweep_with_one_bad_job_fails_before_any_model_loads(sweep, expected, no_model_loads):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")) as err:
        preflight(["model=tiny-llama", "logger=none", *sweep], multirun=True)
    assert "\n" not in str(err.value)


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "run.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cache=nope"], ["cache=nope", "allowed: ", "full", "window"]),
        (["-m", "cache=window", "cache.budget=16,-1"], ["budget=-1", "allowed"]),
        (["task=qa10", "data_dir=<empty>"], ["nq-open-10_total_documents_gold_at_4", "set data_dir"]),  # at run time
    ],
    ids=["unknown-option", "sweep-bad-value", "missing-data-file"],
)
def test_run_py_refuses_bad_config_in_one_line(args, expected, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("<empty>", str(empty)) for a in args]
    proc = run_py("model=tiny-llama", "logger=none", "limit=1", f"output_dir={tmp_path / 'out'}", *args)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for text in expected:
        assert text in err, err
    # Nothing ran: not even the sweep's good first job.
    assert not list(tmp_path.rglob("samples.jsonl"))
