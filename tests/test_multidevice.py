"""Several devices (issue 9), on CPU: every cache layer allocates on the device and dtype of the keys it receives, a
model split by a device_map decodes like the whole model (scripts/multigpu_check.py's core, cpu/cpu), device_map
values are checked in one line, and the per_gpu Hydra launcher runs a sweep's jobs one per (fake) GPU."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import buzz.models
from buzz.attention import kvbench_attention
from buzz.bench import build_model
from buzz.cache import EvictionCache, make_policy
from buzz.models import dispatch, follow_devices, layer_device_map, load_model
from buzz.runner import ConfigError, peak_memory_bytes, peak_memory_bytes_per_device, validate
from tests.conftest import PYTHON, REPO, compose_cfg, needs_data, subprocess_env, tiny_overrides

POLICY_PARAMS = {
    "full": {}, "window": {"budget": 6}, "streaming_llm": {"budget": 6}, "h2o": {"budget": 6}, "buzz": {"budget": 6},
    "buzz_paper": {"sink": 1, "window": 2, "threshold": 3, "stride": 2}, "cascading": {"budget": 6},
}  # fmt: skip
# (device, dtype) of the keys each layer receives: one dtype per layer, and a GPU layer where there is one.
LAYERS = [("cpu", torch.float32), ("cpu", torch.float64)]
LAYERS += [("cuda", torch.bfloat16)] if torch.cuda.is_available() else []


@pytest.fixture
def one_thread():
    """The CPU here is shared: one thread keeps these small models from waiting on each other's threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("policy", POLICY_PARAMS)
def test_cache_layers_live_where_their_keys_do(policy):
    cache = EvictionCache(make_policy(policy, **POLICY_PARAMS[policy]), len(LAYERS))
    b, hq, hkv, d = 2, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    for q in [10, 1, 1, 1, 1, 1, 1]:  # a prefill past the budget, then decode steps that evict
        for i, (dev, dt) in enumerate(LAYERS):
            k, v, query = (torch.randn(b, h, q, d, generator=gen).to(dev, dt) for h in (hkv, hkv, hq))
            cache.update(k, v, i)
            out, _ = kvbench_attention(SimpleNamespace(layer_idx=i), query, k, v, None)
            assert out.dtype == dt and out.device.type == dev and out.isfinite().all()
    for i, (dev, dt) in enumerate(LAYERS):
        layer = cache.layers[i]
        assert (layer.keys.dtype, layer.values.dtype) == (dt, dt), f"layer {i}"
        tensors = [layer.keys, layer.values, layer.valid, layer.pos, layer.seen, layer.budget, layer.score]
        for t in [*tensors, *layer.fields.values()]:
            assert t is None or t.device.type == dev, f"layer {i}"
        assert layer.score is None or layer.score.dtype == torch.float32
    stored = cache.stored_tokens()
    assert policy == "full" or int(stored.max()) < 16  # it evicted


def load_check_script():
    spec = importlib.util.spec_from_file_location("multigpu_check", REPO / "scripts" / "multigpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_multigpu_check_core_on_cpu(one_thread):
    mc = load_check_script()
    model = build_model("tiny", torch.float32, "cpu")
    out = mc.check(model, ("cpu", "cpu"), prompt=32, batch=2, steps=6, warmup=2, budget=0.25)
    assert out["ok"] and list(out["policies"]) == mc.POLICIES
    assert out["device_map"]["model.layers.0"] == "cpu" and out["layer_devices"] == ["cpu", "cpu"]
    for name, r in out["policies"].items():
        assert r["ok"] and r["placement_errors"] == [], name
        assert r["max_abs_logit_diff"] == 0.0 and r["argmax_agree"] == 1.0, name  # same weights, same kernels
        assert r["decode_ms_single"] > 0 and r["decode_ms_split"] > 0 and set(r["peak_bytes_split"]) == {"cpu"}
    assert hasattr(model.model.layers[1], "_hf_hook")  # the split run went through accelerate's hooks


def test_split_map_halves_the_layers():
    mc = load_check_script()
    model = build_model("tiny", torch.float32, "meta", layers=4)
    m = mc.split_map(model, ("cuda:0", "cuda:1"))
    assert [m[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, 1]
    assert (m["model.embed_tokens"], m["model.rotary_emb"], m["model.norm"], m["lm_head"]) == (0, 0, 1, 1)


def test_follow_devices_makes_each_block_s_gpu_current(monkeypatch, one_thread):
    seen = []

    @contextlib.contextmanager
    def fake_device(index):
        seen.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    model = build_model("tiny", torch.float32, "cpu")
    model = dispatch(model, layer_device_map(model.config, ["cpu", "cpu"]))
    model.hf_device_map = layer_device_map(model.config, [0, "cuda:1"])  # pretend: the blocks are on GPUs 0 and 1
    follow_devices(model)
    follow_devices(model)  # idempotent
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [0, 0, 0, 1, 1, 1]  # embeddings, rotary, layer 0; layer 1, norm, head


def test_peak_memory_per_device(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 100 * (i + 1))
    assert peak_memory_bytes(cuda) == 300
    assert peak_memory_bytes_per_device(cuda) == {"cuda:0": 100, "cuda:1": 200}
    assert peak_memory_bytes_per_device(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert peak_memory_bytes_per_device(cuda) is None


@pytest.mark.parametrize(
    "value",
    ["auto", "balanced_low_0", "[cpu,cpu]", "[0,1]", "[cuda:0,cuda:1]", "{model.embed_tokens:0,lm_head:cpu}"],
)
def test_device_map_values_validate(value):
    validate(compose_cfg(["model=tiny-llama", f"model.device_map={value}"]))


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "3", "[]", "[0,-1]", "{model:gpu}", "[true]"])
def test_device_map_errors_are_one_line(value):
    with pytest.raises(ConfigError, match=r"^model\.device_map=.* is invalid; allowed: null, auto, .*cuda:N or cpu$"):
        validate(compose_cfg(["model=tiny-llama", f"model.device_map={value}"]))


def test_load_model_places_by_device_map_and_ignores_device():
    cfg = compose_cfg(["model=tiny-llama", "model.device_map=[cpu,cpu]"]).model
    model, _ = load_model(cfg, "cuda:7")  # never moved to `device` (there is no such GPU here)
    assert model.hf_device_map["model.layers.1"] == "cpu" and hasattr(model.model.layers[0], "_hf_hook")
    assert not buzz.models.is_split(model)
    with pytest.raises(ValueError, match=r"has 3 devices; allowed: one per decoder layer \(2\)$"):
        load_model(compose_cfg(["model=tiny-llama", "model.device_map=[cpu,cpu,cpu]"]).model, "cpu")


@needs_data
def test_job_with_device_map(tmp_path, one_thread):
    from buzz.runner import run

    summary = run(compose_cfg(tiny_overrides(tmp_path, "xsum", "model.device_map=[cpu,cpu]", limit=1)))
    assert summary["status"] == "done" and summary["n"] == 1
    assert "peak_memory_bytes_per_device" in summary and summary["peak_memory_bytes"] > 0


@needs_data
def test_per_gpu_launcher_runs_one_job_per_gpu(tmp_path):
    """Two jobs, two (fake) GPUs: both start at once, each claims its own GPU, both write their records."""
    env = subprocess_env() | {"CUDA_VISIBLE_DEVICES": "0,1"}  # ids only: the jobs run on the CPU here
    overrides = [o for o in tiny_overrides(tmp_path, "xsum", limit=1) if not o.startswith("task.max_new_tokens")]
    cmd = [PYTHON, "run.py", "-m", "hydra/launcher=per_gpu", *overrides, "task.max_new_tokens=2", "cache=full,window"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "[per_gpu] job on GPU 0" in log and "[per_gpu] job on GPU 1" in log, log[-3000:]
    summaries = sorted(tmp_path.glob("xsum/tiny-llama/*/summary.json"))
    assert [p.parent.name.split("-")[0] for p in summaries] == ["full", "window"]
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["status"] == "done" and summary["n"] == 1
        assert len((path.parent / "samples.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / ".hydra" / "gpu_locks").iterdir()) == ["gpu-0", "gpu-1"]


def test_per_gpu_launcher_passes_the_preflight():
    from buzz.cli import preflight

    assert preflight(["hydra/launcher=per_gpu", "model=tiny-llama", "cache=full,window"], multirun=True) == 2
    assert Path(REPO / "configs" / "hydra" / "launcher" / "per_gpu.yaml").is_file()
