"""Spreading ChatGLM over several devices: accelerate's placement with GLM's constraints.

`infer_device_map(model, "auto", max_memory, dtype)` asks accelerate
(`get_balanced_memory` + `infer_auto_device_map`) where each module goes, on a
model built on the meta device (nothing is allocated), with:

- every `GLMBlock` whole on one device (`_no_split_modules`);
- the word embeddings on the first device, with the tied `lm_head` (one copy
  of the 130528 x 4096 matrix; accelerate keeps tied weights together);
- the P-Tuning prefix encoder planned right after the embeddings (accelerate
  plans modules in order; the encoder is registered after the blocks, so the
  planner sees it moved up), hence on the first device unless the budgets
  leave no room for it there;
- the final LayerNorm after the last block, on that block's device (accelerate's
  order); it is never offloaded (the forward reads its two vectors directly).
  The final hidden state `[s, b, h]` then moves to the head's device.

`check_device_map` validates a map given by hand (complete, blocks whole, tied
weights together). The loader (`glm_kernels.loading`) allocates each weight on
its device, writes the weights of `"disk"` modules to `offload_folder`, and
hands offloaded maps to `accelerate.dispatch_model`; the model's forward moves
the hidden states between devices at block boundaries and the inputs of the
blocks (positions, mask, rotary tables) once per device per forward.
"""
from __future__ import annotations

import contextlib
import os
from typing import Mapping

import torch
from torch import nn

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD = ("cpu", "disk")
PINNED = ("transformer.final_layernorm",)  # read by the forward without calling the module: never offloaded


def execution_device(module: nn.Module, tensor: torch.Tensor | None = None) -> torch.device:
    """The device `module` computes on: accelerate's execution device when it is dispatched with hooks
    (its weights may then be on "meta", loaded at each call), else that of `tensor` (one of its weights)."""
    hook = module.__dict__.get("_hf_hook")  # set by accelerate's add_hook_to_module (a plain attribute)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return as_device(device)
    if tensor is None:
        tensor = next(module.parameters())
    return tensor.device


def as_device(device) -> torch.device:
    """accelerate's spelling of a device (an int is a GPU index) as a `torch.device`."""
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def spell(device):
    """A device as accelerate's maps spell it: an int GPU index, "cpu", "disk", or a `torch.device` string."""
    if isinstance(device, int) or device in OFFLOAD:
        return device
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device_map must be a dict, a device or one of {AUTO_MAPS}, got {device!r}") from err


def device_of(name: str, device_map: Mapping[str, object], default=None):
    """The device a tensor or module `name` gets from `device_map` (longest matching module prefix)."""
    best, found = -1, default
    for key, device in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if len(key) > best:
                best, found = len(key), device
    return found


def _tie(model) -> None:
    if getattr(model.config, "tie_word_embeddings", True) and hasattr(model, "lm_head"):
        model.tie_weights()


def _prefix(model) -> str:
    return "" if not hasattr(model, model.base_model_prefix) else model.base_model_prefix + "."


def infer_device_map(model, device_map="auto", max_memory=None, dtype=None) -> dict:
    """accelerate's device map for `model` (built on the meta device), with GLM's constraints (module docstring).

    Args:
        device_map: "auto" / "balanced" / "balanced_low_0" (accelerate's balanced budgets, as
            transformers computes them) or "sequential" (fill each device in turn).
        max_memory: `{0: "10GiB", 1: "10GiB", "cpu": "30GiB"}` (accelerate's form); None for what
            the devices have free. What does not fit goes to "disk" (accelerate's last resort).
        dtype: the dtype the weights will have.
    Returns:
        `{module name: device}`, devices as accelerate spells them (int GPU index, "cpu", "disk").
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if device_map not in AUTO_MAPS:
        raise ValueError(f"device_map must be a dict, a device or one of {AUTO_MAPS}, got {device_map!r}")
    _tie(model)
    no_split = list(model._no_split_modules)
    max_memory = dict(max_memory) if max_memory is not None else None
    if max_memory is not None:
        max_memory.pop("disk", None)  # accelerate always ends its plans with "disk" (and cannot balance it)
    if device_map == "sequential":
        budgets = get_max_memory(max_memory)
    else:
        budgets = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                      low_zero=device_map == "balanced_low_0")
    with _prefix_encoder_first(model):
        plan = infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=no_split, dtype=dtype,
                                     clean_result=False)
    return _constrain(model, dict(plan))


@contextlib.contextmanager
def _prefix_encoder_first(model):
    """Let accelerate see the prefix encoder (and its dropout) right after the word embeddings."""
    base = getattr(model, model.base_model_prefix, model)
    order = dict(base._modules)
    if "prefix_encoder" not in order:
        yield
        return
    moved = ("prefix_encoder", "dropout")
    front = {}
    for name, module in order.items():
        if name not in moved:
            front[name] = module
        if name == "word_embeddings":
            front.update({m: order[m] for m in moved if m in order})
    base._modules.clear()
    base._modules.update(front)
    try:
        yield
    finally:
        base._modules.clear()
        base._modules.update(order)


def _constrain(model, plan: dict) -> dict:
    """Pinned modules on a computing device, entries without weights dropped; everything else as planned."""
    from accelerate.utils.modeling import clean_device_map

    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for key in [k for k in plan if not any(n == k or n.startswith(k + ".") for n in names)]:
        del plan[key]  # e.g. the prefix dropout: nothing to place
    for key, _ in _offloaded_pins(model, plan):
        for sub in [k for k in plan if k == key or k.startswith(key + ".")]:
            del plan[sub]
        plan[key] = main_device(plan)
    return clean_device_map(plan)


def _offloaded_pins(model, plan) -> list:
    """`(module, device)` of the `PINNED` modules that `plan` offloads."""
    keys = PINNED if _prefix(model) else [name[len("transformer."):] for name in PINNED]
    found = [(key, device_of(key + ".weight", plan)) for key in keys]
    return [(key, device) for key, device in found if device in _offloaded(main_device(plan))]


def _offloaded(main) -> tuple:
    """Devices whose modules accelerate offloads (loads to the main device at each call)."""
    return ("disk",) if main == "cpu" else OFFLOAD


def main_device(plan: Mapping[str, object]):
    """The device that runs offloaded modules: the first accelerator of the map, else "cpu"."""
    for device in plan.values():
        if device not in OFFLOAD:
            return device
    return "cpu"


def check_device_map(model, device_map: Mapping[str, object]) -> dict:
    """Validate a device map given by hand; returns it as a dict. Raises `ValueError` naming the problem."""
    from accelerate.utils import check_device_map as accelerate_check, find_tied_parameters

    plan = {k: spell(v) for k, v in device_map.items()}
    _tie(model)
    accelerate_check(model, plan)  # every weight covered
    layers = f"{_prefix(model)}layers."
    for key in plan:
        if key.startswith(layers) and key[len(layers):].count(".") >= 1:
            block = layers + key[len(layers):].split(".")[0]
            raise ValueError(f"device_map splits {block} ({key!r}): a GLMBlock must stay whole on one device")
    for group in find_tied_parameters(model):
        devices = {name: device_of(name, plan) for name in group}
        if len(set(devices.values())) > 1:
            raise ValueError(f"tied weights must share a device, the device_map puts {devices}")
    for key, device in _offloaded_pins(model, plan):
        raise ValueError(f"device_map offloads {key} to {device}: it runs on {main_device(plan)} (2 x hidden_size "
                         "values), map it there")
    return plan


def resolve_device_map(model, device_map, max_memory=None, dtype=None) -> dict:
    """A map from what `from_pretrained` was given: "auto"-like strings, a dict, or one device for all."""
    if isinstance(device_map, Mapping):
        return check_device_map(model, device_map)
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        return infer_device_map(model, device_map, max_memory, dtype)
    if isinstance(device_map, (str, int, torch.device)):
        return {"": spell(device_map)}
    raise ValueError(f"device_map must be a dict, a device or one of {AUTO_MAPS}, got {device_map!r}")


def needs_hooks(plan: Mapping[str, object]) -> bool:
    """Whether accelerate's hooks are needed: some weights live off their computing device (cpu/disk offload)."""
    main = main_device(plan)
    return any(device in _offloaded(main) for device in plan.values())


def load_model_on_gpus(checkpoint_path: str | os.PathLike, num_gpus: int = 2, device_map=None, **kwargs):
    """THUDM's `utils.load_model_on_gpus`: ChatGLM in fp16 over the first `num_gpus` GPUs.

    One GPU (and no map): the whole model on `cuda`. Several: the blocks balanced over GPUs
    `0 .. num_gpus - 1` by accelerate (`device_map="auto"` with `max_memory` limited to those GPUs'
    free memory), embeddings, prefix encoder and the tied head on GPU 0, or your `device_map`.
    Other keyword arguments go to `from_pretrained` (`torch_dtype` overrides fp16).
    """
    from .modeling import ChatGLMForConditionalGeneration

    kwargs.setdefault("torch_dtype", torch.float16)
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if device_map is None and num_gpus > torch.cuda.device_count():
        raise ValueError(f"load_model_on_gpus(num_gpus={num_gpus}): this machine has {torch.cuda.device_count()} "
                         "CUDA devices")
    if num_gpus < 2 and device_map is None:
        return ChatGLMForConditionalGeneration.from_pretrained(checkpoint_path, device="cuda", **kwargs)
    if device_map is None:
        device_map = "auto"
        kwargs.setdefault("max_memory", {i: torch.cuda.mem_get_info(i)[0] for i in range(num_gpus)})
    return ChatGLMForConditionalGeneration.from_pretrained(checkpoint_path, device_map=device_map, **kwargs)
