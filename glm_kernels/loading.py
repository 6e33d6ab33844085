"""Loading original ChatGLM-6B checkpoints and P-Tuning v2 prefixes.

Layouts read (in this order of preference, in a local directory):
`model.safetensors.index.json` + shards, `model.safetensors`,
`pytorch_model.bin.index.json` + shards (the released 6B layout),
`pytorch_model.bin`. Tensors are read with `safetensors` or
`torch.load(weights_only=True, mmap=True)`.

Every shard's keys and shapes are checked against the model before any
memory is allocated for weights; errors name the file, the key and the shape.
The model is built on the meta device, allocated once in the target dtype and
filled shard by shard, so peak memory is one copy of the weights plus one
shard's mapped pages (README: "Loading memory").

With `device_map` (docs/gpu.md) each weight is allocated on its device from
accelerate's plan (`glm_kernels.placement`), the weights of modules mapped to
"disk" are written to `offload_folder` as they are read, and offloaded maps are
dispatched with `accelerate.dispatch_model`.

The keyword arguments of transformers' / THUDM's `from_pretrained` are
accepted: those for the hub go to `snapshot_download`, those without a meaning
here are ignored (`IGNORED_ARGS` says why, logged at INFO), and those asking
for something this loader does not do are refused (`REFUSED_ARGS`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from safetensors.torch import save_file

from . import placement
from .configuration import ChatGLMConfig

logger = logging.getLogger(__name__)

INV_FREQ = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
PREFIX_KEY = "transformer.prefix_encoder."
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
# transformers' / THUDM's from_pretrained arguments
HUB_ARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies")
IGNORED_ARGS = {
    "trust_remote_code": "the modeling code is this package's: no remote code is run",
    "code_revision": "the modeling code is this package's: no remote code is run",
    "low_cpu_mem_usage": "loading always builds the model on the meta device and fills it shard by shard",
    "_fast_init": "loading always builds the model on the meta device and fills it shard by shard",
    "empty_init": "loading always builds the model on the meta device and fills it shard by shard",
    "offload_state_dict": "weights are streamed shard by shard; the state dict is never held whole",
    "resume_download": "deprecated by huggingface_hub: downloads always resume",
    "mirror": "deprecated by transformers",
}
# refused unless given the harmless value shown
REFUSED_ARGS = {
    "quantization_config": (None, "quantization is THUDM's weight-only scheme: pass quantization_bit=8 or 4"),
    "load_in_8bit": (False, "quantization is THUDM's weight-only scheme: pass quantization_bit=8"),
    "load_in_4bit": (False, "quantization is THUDM's weight-only scheme: pass quantization_bit=4"),
    "from_tf": (False, "only PyTorch checkpoints (.bin, .safetensors) are read"),
    "from_flax": (False, "only PyTorch checkpoints (.bin, .safetensors) are read"),
    "gguf_file": (None, "only PyTorch checkpoints (.bin, .safetensors) are read"),
    "state_dict": (None, "pass a checkpoint directory (or load_state_dict on a built model)"),
    "variant": (None, "weight-file variants (pytorch_model.<variant>.bin) are not read"),
    "attn_implementation": (None, "attention is GLM's fused op; choose its backend with kernel_backend="),
    "tp_plan": (None, "tensor parallelism is not supported: spread the layers with device_map"),
    "key_mapping": (None, "checkpoint keys are the original ChatGLM-6B names"),
    "ignore_mismatched_sizes": (False, "shapes are always checked: a mismatch raises naming the key"),
    "output_loading_info": (False, "loading is strict: missing or unexpected keys raise (or pass strict=False)"),
    "weights_only": (True, "checkpoints are only read with weights_only=True (no pickled code)"),
}


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def checkpoint_files(path, use_safetensors: bool | None = None) -> list[Path]:
    """The weight files of a checkpoint directory (or a single weight file), checked to exist.

    `use_safetensors`: True for safetensors layouts only, False for .bin only, None for either.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(f"{path} is not a weight file (.safetensors, .bin, .pt or .pth)")
        return [path]
    for name, is_index in _WEIGHT_LAYOUTS:
        candidate = path / name
        if not candidate.is_file() or (use_safetensors is not None and ("safetensors" in name) != use_safetensors):
            continue
        if not is_index:
            return [candidate]
        try:
            weight_map = json.loads(candidate.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"index {candidate} is not a valid weight index (needs a 'weight_map'): {err}") from err
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{candidate} lists shard {shard}, which is missing from {path}")
        return [path / shard for shard in shards]
    names = ", ".join(name for name, _ in _WEIGHT_LAYOUTS
                      if use_safetensors is None or ("safetensors" in name) == use_safetensors)
    raise FileNotFoundError(f"no weights in {path}: expected one of {names}")


def _load_bin(path: Path) -> dict:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:
        raise ValueError(f"cannot read checkpoint file {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {path} does not hold a flat state dict of tensors")
    return state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def shard_headers(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Key -> (shape, dtype) of one weight file, reading headers only where the format allows."""
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                out = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
                return out
        except Exception as err:
            raise ValueError(f"cannot read checkpoint file {path}: {err}") from err
    return {k: (tuple(v.shape), v.dtype) for k, v in _load_bin(path).items()}


def shard_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one weight file, reading headers only where the format allows."""
    return {k: shape for k, (shape, _) in shard_headers(path).items()}


def shard_tensors(path: Path):
    """Yield `(key, tensor)` of one weight file (memory-mapped where possible)."""
    if _is_safetensors(path):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        yield from _load_bin(path).items()


def _rename_for(model, key: str) -> str | None:
    """Map a checkpoint key onto `model`'s names (base model vs LM), or None to skip it."""
    prefix = model.base_model_prefix + "."
    is_base = not hasattr(model, model.base_model_prefix)
    if is_base:
        if key == "lm_head.weight":
            return None
        return key[len(prefix):] if key.startswith(prefix) else key
    if key == "lm_head.weight" or key.startswith(prefix):
        return key
    return prefix + key


def _fmt_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:8])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _resolve_dtype(dtype, config: ChatGLMConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if not dtype.startswith("torch.") else getattr(torch, dtype[6:], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype, 'auto' or None, got {dtype!r}")
    return dtype


def _resolve_directory(name_or_path, hub_args=None) -> Path:
    path = Path(name_or_path)
    if path.exists():
        if hub_args:
            logger.info("from_pretrained: %s ignored for the local directory %s", ", ".join(hub_args), path)
        return path
    text = str(name_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"],
                                          **(hub_args or {})))
        except Exception as err:
            raise FileNotFoundError(f"{text} is neither a local directory nor a downloadable hub repo: {err}") \
                from err
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """`(hub arguments, config overrides)` from the remaining keyword arguments; ignored ones are logged,
    refused ones raise `TypeError` saying why."""
    hub, overrides = {}, {}
    for key, value in kwargs.items():
        if key in HUB_ARGS or key == "use_auth_token":
            if value is not None:
                hub["token" if key == "use_auth_token" else key] = value
        elif key in IGNORED_ARGS:
            logger.info("from_pretrained: %s=%r ignored: %s", key, value, IGNORED_ARGS[key])
        elif key in REFUSED_ARGS:
            harmless, why = REFUSED_ARGS[key]
            if value is not harmless and value != harmless:
                raise TypeError(f"from_pretrained({key}={value!r}) is not supported: {why}")
        else:
            overrides[key] = value
    return hub, overrides


def from_pretrained(cls, name_or_path, config=None, dtype=None, ptuning_checkpoint=None, device=None,
                    strict=True, device_map=None, max_memory=None, offload_folder=None, offload_buffers=False,
                    use_safetensors=None, subfolder="", **kwargs):
    """Build `cls` from a checkpoint directory in the original layout.

    Args:
        name_or_path: local directory (`config.json` + weights) or a hub repo id.
        config: a `ChatGLMConfig` to use instead of the directory's `config.json`.
        dtype: `torch_dtype`: a floating dtype, its name, or "auto"/None for
            the `torch_dtype` recorded in `config.json` (fp32 if none).
        ptuning_checkpoint: a P-Tuning v2 checkpoint (directory or file) to
            load over the base weights; needs `pre_seq_len` in the config or
            in `config_overrides`.
        device: where to allocate the weights (default CPU).
        strict: raise on missing or unexpected keys (shape mismatches always raise).
        device_map: spread the model over devices (`glm_kernels.placement`):
            "auto" / "balanced" / "balanced_low_0" / "sequential" (accelerate's
            plans), a dict `{module name: device}` (0, "cuda:1", "cpu", "disk"),
            or one device for everything.
        max_memory: per-device budgets for the "auto" plans, accelerate's form
            `{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}`.
        offload_folder: where the weights of modules mapped to "disk" are written.
        offload_buffers: offload the buffers of offloaded modules too (accelerate).
        use_safetensors: True / False to read only safetensors / .bin weights.
        subfolder: the checkpoint's subfolder in the directory or repo.
        kwargs: config fields to set, e.g. `pre_seq_len=128`,
            `prefix_projection=False`, `kernel_backend="torch"`; hub arguments
            (`revision`, `cache_dir`, `token`, ...) for a hub id; transformers'
            other arguments as `IGNORED_ARGS` / `REFUSED_ARGS` say.
    """
    hub_args, config_overrides = _split_kwargs(kwargs)
    if device is not None and device_map is not None:
        raise TypeError("from_pretrained takes device or device_map, not both")
    directory = _resolve_directory(name_or_path, hub_args)
    if subfolder:
        directory = directory / subfolder
    if config is None:
        config_file = directory / "config.json" if directory.is_dir() else directory.parent / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {config_file.parent}")
        config = ChatGLMConfig.from_pretrained(str(config_file.parent))
    else:
        config = config.__class__.from_dict(config.to_dict())
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"from_pretrained got an unexpected argument {key!r} (not a ChatGLMConfig field)")
        setattr(config, key, value)
    config.validate_model_shape()
    dtype = _resolve_dtype(dtype, config)
    files = checkpoint_files(directory, use_safetensors)
    if config.quantization_bit and device_map is not None:
        raise TypeError(f"from_pretrained(device_map=...) with quantization_bit={config.quantization_bit} is not "
                        "supported: load the quantized model on one device (device=...)")

    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    dtypes: dict[str, torch.dtype | None] = {}
    for file in files:
        for raw_key, (shape, tensor_dtype) in shard_headers(file).items():
            key = _rename_for(model, raw_key)
            if key is None:
                continue
            if key in found:
                raise ValueError(f"key {raw_key} appears in both {found[key][0]} and {file}")
            found[key] = (file, shape)
            dtypes[key] = tensor_dtype

    quantized = _quantized_sources(model, config, found, dtypes)
    _check_keys(model, config, expected, found, strict, quantized)
    model.to(dtype)
    plan = None
    if device_map is None:
        model.to_empty(device=device or "cpu")
    else:
        plan = placement.resolve_device_map(model, device_map, max_memory, dtype)
        if "disk" in plan.values() and offload_folder is None:
            raise ValueError(f"the device_map offloads {[k for k, v in plan.items() if v == 'disk']} to disk: pass "
                             "offload_folder=")
        _allocate(model, plan)
    _reset_buffers(model)
    if getattr(config, "tie_word_embeddings", True):
        model.tie_weights()
    # the parameters themselves (state_dict() would convert a CPU-packed quantized weight into a copy)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update((k, v) for k, v in model.named_buffers(remove_duplicate=False) if k in expected)
    on_disk = set() if plan is None else {k for k in params if placement.device_of(k, plan) == "disk"}
    offload_index = {}
    loaded = set()
    partners = {}
    for a, b in (("transformer.word_embeddings.weight", "lm_head.weight"),
                 ("transformer.word_embeddings.weight_scale", "lm_head.weight_scale")):
        if a in params and params.get(b) is params[a]:
            partners[a], partners[b] = b, a
    with torch.no_grad():
        for file in files:
            for raw_key, tensor in shard_tensors(file):
                key = _rename_for(model, raw_key)
                if key is None or key not in params or INV_FREQ.search(key):
                    continue
                if key in loaded and key in _TIED_KEYS:
                    continue  # tied to word_embeddings, already loaded from it
                owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
                if owner in quantized and leaf in ("weight", "weight_scale"):
                    _load_quantized(model.get_submodule(owner), owner, leaf, tensor, quantized[owner], loaded, partners)
                    continue
                tied_head = key.endswith("word_embeddings.weight") and params.get("lm_head.weight") is params[key]
                if key in on_disk:  # written to the offload folder as it is read
                    _offload(tensor.to(dtype), [key] + (["lm_head.weight"] if tied_head else []), offload_folder,
                             offload_index)
                else:
                    params[key].copy_(tensor)
                loaded.add(key)
                if tied_head:
                    loaded.add("lm_head.weight")
            # tensors of this shard go out of scope here, unmapping its file
    _initialise_unloaded(model, params, loaded, on_disk)
    if config.quantization_bit:
        model.settle_quantized()  # re-tie a quantized head, repack int4 weights for the CPU kernel
    if ptuning_checkpoint is not None:
        load_ptuning_checkpoint(model, ptuning_checkpoint)
    model.eval()
    if plan is not None:
        _dispatch(model, plan, offload_folder, offload_index, offload_buffers)
    return model


def _allocate(model, plan) -> None:
    """Give every weight and buffer storage on its device in `plan`; weights of "disk" modules stay on meta
    (their buffers go to the computing device). Tied weights stay one tensor."""
    main = placement.main_device(plan)
    made = {}
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for name, t in list(tensors.items()):
                if t is None:
                    continue
                # a tensor in no entry (a non-persistent buffer of a split module) goes with the module's first
                # planned part (transformer.prefix_tokens: with the embeddings)
                owner = module_name + "." if module_name else ""
                first_part = next((d for k, d in plan.items() if k.startswith(owner)), main)
                device = placement.device_of(f"{module_name}.{name}" if module_name else name, plan, first_part)
                if device == "disk":
                    if kind == "_parameters":
                        continue
                    device = main
                if id(t) not in made:
                    empty = torch.empty_like(t, device=placement.as_device(device))
                    made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if kind == "_parameters" \
                        else empty
                tensors[name] = made[id(t)]


def _offload(tensor, names, folder, index) -> None:
    from accelerate.utils import offload_weight

    os.makedirs(folder, exist_ok=True)
    for name in names:
        offload_weight(tensor, name, str(folder), index)


def _dispatch(model, plan, offload_folder, offload_index, offload_buffers) -> None:
    """accelerate's hooks when weights live off their computing device (cpu/disk offload); `hf_device_map`."""
    if offload_index:
        from accelerate.utils import save_offload_index

        save_offload_index(offload_index, str(offload_folder))
    if placement.needs_hooks(plan):
        from accelerate import dispatch_model

        # GLMBlock reads its submodules' weights without calling them: load the whole block at its call
        dispatch_model(model, plan, main_device=placement.main_device(plan), offload_dir=offload_folder,
                       offload_buffers=offload_buffers, preload_module_classes=["GLMBlock"])
    model.hf_device_map = dict(plan)


_TIED_KEYS = ("lm_head.weight", "lm_head.weight_scale")


def _quantized_sources(model, config, found, dtypes) -> dict[str, str]:
    """For each quantized module (by name): "quantized" when the checkpoint holds THUDM's int8 `weight` +
    `weight_scale`, "float" when it holds a floating `weight` to quantize while loading. Raises `ValueError`
    naming the key when the checkpoint's layout does not match `config.quantization_bit`."""
    from .quant.layout import stored_shape
    from .quant.modules import quantized_modules

    scales = sorted(k for k in found if k.endswith(".weight_scale"))
    if scales and not config.quantization_bit:
        key = scales[0]
        stored = found.get(key[:-len("_scale")], (None, ()))[1]
        raise ValueError(f"the checkpoint is quantized ({key} in {found[key][0]}, weight {list(stored)}) but "
                         "config.quantization_bit is 0: its config.json should say quantization_bit 4 or 8 (or pass "
                         "quantization_bit= to from_pretrained)")
    sources = {}
    for name, module in quantized_modules(model):
        wkey, skey = f"{name}.weight", f"{name}.weight_scale"
        if wkey not in found:
            continue  # missing keys (or a tied head stored once) are _check_keys' business
        file, shape = found[wkey]
        tensor_dtype = dtypes.get(wkey)
        bits, rows, columns = module.bits, module.rows, module.columns
        want = stored_shape(rows, columns, bits)
        if tensor_dtype is not None and tensor_dtype.is_floating_point:
            if skey in found:
                raise ValueError(f"{skey} is in {found[skey][0]} but {wkey} in {file} is {tensor_dtype}: a quantized "
                                 "weight is stored as int8")
            if shape != (rows, columns):
                raise ValueError(f"{wkey} in {file} has shape {list(shape)}, the model expects a floating "
                                 f"[{rows}, {columns}] weight (quantized to {bits} bits while loading) or THUDM's "
                                 f"int8 {list(want)}")
            sources[name] = "float"
            continue
        if tensor_dtype != torch.int8:
            raise ValueError(f"{wkey} in {file} is {tensor_dtype}: expected THUDM's int8 {list(want)} with "
                             f"quantization_bit={bits}, or a floating weight to quantize")
        if skey not in found:
            raise ValueError(f"{wkey} in {file} is int8 (quantized) but the checkpoint has no {skey}: THUDM's layout "
                             "stores both")
        other = 12 - bits
        if shape != want:
            if shape == stored_shape(rows, columns, other):
                raise ValueError(f"{wkey} in {file} is int8 {list(shape)}: the checkpoint is quantized to {other} "
                                 f"bits but config.quantization_bit={bits} (a quantized checkpoint is loaded with its "
                                 "own bits)")
            raise ValueError(f"{wkey} in {file} has shape {list(shape)}, the model expects int8 {list(want)} "
                             f"(quantization_bit={bits})")
        scale_file, scale_shape = found[skey]
        scale_dtype = dtypes.get(skey)
        if scale_shape != (rows,) or scale_dtype is None or not scale_dtype.is_floating_point:
            raise ValueError(f"{skey} in {scale_file} is {scale_dtype} {list(scale_shape)}, the model expects a "
                             f"floating (fp16) [{rows}]")
        sources[name] = "quantized"
    return sources


def _load_quantized(module, name, leaf, tensor, source, loaded, partners) -> None:
    """Write one checkpoint tensor into a quantized module: THUDM's int8 / scale as they are, or a floating
    weight quantized on the way in (its scale is computed with it). `partners`: key -> the tied key sharing
    its parameter (a quantized head tied to the quantized embeddings), loaded with it."""
    if source == "float":
        module.quantize_from(tensor, f"{name}.weight")
        keys = {f"{name}.weight", f"{name}.weight_scale"}
    elif leaf == "weight":
        module.set_weight(tensor, f"{name}.weight")
        keys = {f"{name}.weight"}
    else:
        module.set_scale(tensor, f"{name}.weight_scale")
        keys = {f"{name}.weight_scale"}
    loaded.update(keys | {partners[k] for k in keys if k in partners})


def _check_keys(model, config, expected, found, strict, quantized=None):
    quantized = quantized or {}
    tied = getattr(config, "tie_word_embeddings", True)
    embed = "transformer.word_embeddings.weight" if "lm_head.weight" in expected else "word_embeddings.weight"
    optional = {k for k in expected if INV_FREQ.search(k)}
    # a floating weight quantized while loading brings its own weight_scale
    optional |= {f"{name}.weight_scale" for name, source in quantized.items() if source == "float"}
    prefix_keys = {k for k in expected if "prefix_encoder." in k}
    if prefix_keys and not (prefix_keys & found.keys()):
        optional |= prefix_keys  # a base checkpoint for P-Tuning: the prefix encoder starts fresh
    if tied and "lm_head.weight" in expected and (embed in found or "lm_head.weight" in found):
        optional |= {"lm_head.weight", embed}
        if "lm_head.weight_scale" in expected:  # a quantized tied head: either copy of the pair
            optional |= {"lm_head.weight_scale", embed + "_scale"}
    missing = expected.keys() - found.keys() - optional
    unexpected = {k for k in found.keys() - expected.keys() if not INV_FREQ.search(k)}
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
            if any("prefix_encoder." in k for k in unexpected) and config.pre_seq_len is None:
                parts.append("the checkpoint holds a P-Tuning prefix encoder but config.pre_seq_len is None")
        files = sorted({str(f) for f, _ in found.values()})
        raise ValueError(f"checkpoint ({', '.join(files)}) does not match {type(model).__name__}: "
                         + "; ".join(parts))
    checked = {f"{name}.{leaf}" for name in quantized for leaf in ("weight", "weight_scale")}
    for key, (file, shape) in found.items():
        if key in expected and key not in checked and shape != expected[key]:
            raise ValueError(f"{key} in {file} has shape {list(shape)}, the model expects {list(expected[key])}"
                             + _shape_hint(key, shape, config))


def _shape_hint(key, shape, config) -> str:
    if key.endswith("prefix_encoder.embedding.weight") and config.pre_seq_len is not None:
        if shape[0] != config.pre_seq_len:
            return f" (checkpoint trained with pre_seq_len={shape[0]}, model has pre_seq_len={config.pre_seq_len})"
        width = 2 * config.num_layers * config.hidden_size
        if config.prefix_projection and shape[1] == width:
            return " (checkpoint trained with prefix_projection=False, model has prefix_projection=True)"
        if not config.prefix_projection and shape[1] == config.hidden_size:
            return " (checkpoint trained with prefix_projection=True, model has prefix_projection=False)"
    return ""


def _reset_buffers(model) -> None:
    from .modeling import ChatGLMModel, RotaryEmbedding

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
            if isinstance(module, ChatGLMModel) and module.pre_seq_len is not None:
                module.prefix_tokens.copy_(torch.arange(module.pre_seq_len))


def _initialise_unloaded(model, params, loaded, on_disk=()) -> None:
    """Give parameters the checkpoint did not hold (a fresh prefix encoder, non-strict loads) their default init."""
    owners = {}
    for key in params:
        if key in loaded or INV_FREQ.search(key) or not isinstance(params[key], torch.nn.Parameter):
            continue
        if key in on_disk:
            raise ValueError(f"{key} is not in the checkpoint and the device_map offloads it to disk: nothing to "
                             "initialise it from (map its module to a device)")
        owner = key.rsplit(".", 1)[0]
        owners.setdefault(owner, model.get_submodule(owner))
    for name, module in owners.items():
        if not hasattr(module, "reset_parameters"):
            raise ValueError(f"parameters of {name} were not in the checkpoint and it has no default init")
        module.reset_parameters()


# ---------------------------------------------------------------- P-Tuning v2


def _base_model(model):
    return getattr(model, model.base_model_prefix, model)


def load_ptuning_checkpoint(model, path) -> None:
    """Load a P-Tuning v2 checkpoint (keys `transformer.prefix_encoder.*` only) into `model`.

    `path` is a directory (`pytorch_model.bin` as THUDM's trainer saves it,
    `model.safetensors`, or sharded) or a weight file. Everything is checked
    before the first tensor is copied, so a failed load leaves the model as it was.
    """
    base = _base_model(model)
    if base.pre_seq_len is None:
        raise ValueError("the model has no prefix encoder (config.pre_seq_len is None); build or load it with "
                         "pre_seq_len equal to the checkpoint's")
    load_prefix_encoder(base.prefix_encoder, path, base.config)


def ptuning_settings(directory, pre_seq_len: int | None = None) -> dict:
    """What a P-Tuning checkpoint needs of the model, from the `config.json` saved beside its weights:
    `pre_seq_len` (the one given, as THUDM's `--pre_seq_len`, wins over the file's), `prefix_projection`, and the
    model-shape fields the file records (`num_layers`, `hidden_size`, `num_attention_heads`)."""
    config_file = Path(directory) / "config.json"
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    pre_seq_len = saved.get("pre_seq_len") if pre_seq_len is None else pre_seq_len
    if pre_seq_len is None:
        raise FileNotFoundError(f"{config_file} not found or without pre_seq_len: pass the prefix length "
                                "(--pre-seq-len)")
    if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
        raise ValueError(f"{directory}: pre_seq_len must be a positive integer, got {pre_seq_len!r}")
    shape = {k: saved[k] for k in ("num_layers", "hidden_size", "num_attention_heads") if k in saved}
    return {"pre_seq_len": pre_seq_len, "prefix_projection": bool(saved.get("prefix_projection", False)), **shape}


def load_prefix_encoder(encoder, path, config) -> None:
    """Load a P-Tuning v2 checkpoint into a `PrefixEncoder` built from `config` (its `pre_seq_len`,
    `prefix_projection`, layers and hidden size); checked whole before anything is copied."""
    files = checkpoint_files(path)
    state = {}
    for file in files:
        for key, tensor in shard_tensors(file):
            if key.startswith(PREFIX_KEY):
                short = key[len(PREFIX_KEY):]
            elif key.startswith("prefix_encoder."):
                short = key[len("prefix_encoder."):]
            else:
                raise ValueError(f"{file} holds {key}, which is not a prefix-encoder key: a P-Tuning checkpoint "
                                 "holds only transformer.prefix_encoder.* (load full weights with from_pretrained)")
            state[short] = (file, tensor)
    targets = encoder.state_dict(keep_vars=True)
    has_trans = any(k.startswith("trans.") for k in state)
    if has_trans != encoder.prefix_projection:
        raise ValueError(f"P-Tuning checkpoint {path} was trained with prefix_projection={has_trans}, the model "
                         f"has prefix_projection={encoder.prefix_projection}")
    missing, unexpected = targets.keys() - state.keys(), state.keys() - targets.keys()
    if missing or unexpected:
        raise ValueError(f"P-Tuning checkpoint {path} does not match the prefix encoder: "
                         f"missing {_fmt_keys(PREFIX_KEY + k for k in missing) or 'none'}, "
                         f"unexpected {_fmt_keys(PREFIX_KEY + k for k in unexpected) or 'none'}")
    for key, (file, tensor) in state.items():
        if tuple(tensor.shape) != tuple(targets[key].shape):
            raise ValueError(f"{PREFIX_KEY}{key} in {file} has shape {list(tensor.shape)}, the model expects "
                             f"{list(targets[key].shape)}" + _shape_hint(PREFIX_KEY + key, tuple(tensor.shape),
                                                                         config))
    with torch.no_grad():
        for key, (_, tensor) in state.items():
            targets[key].copy_(tensor)


def save_ptuning_checkpoint(model, directory) -> Path:
    """Write the prefix encoder to `DIR/model.safetensors` (keys `transformer.prefix_encoder.*`) and `config.json`."""
    base = _base_model(model)
    if base.pre_seq_len is None:
        raise ValueError("the model has no prefix encoder (config.pre_seq_len is None): nothing to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX_KEY + k: v.detach().contiguous().cpu() for k, v in base.prefix_encoder.state_dict().items()}
    target = directory / "model.safetensors"
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    base.config.save_pretrained(str(directory))
    return target
