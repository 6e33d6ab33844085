"""The one-call decoding step's arguments, gathered once per cache, and what tells whether they still hold.

A CPU decoding step in one C++ call (`ops.step_infer`) takes ~150 tensors: every weight, norm and cache buffer.
Gathering them and looking at every module for hooks reads a few hundred Python objects per step, which the step's
weight stream has swept from every cache: ~0.6 ms of a 10-15 ms INT4 token of the benchmark model
(docs/quantization.md). A `StepPlan` gathers them once for a model and a `GLMKVCache` (it lives on the cache, so it
never keeps a finished generation's buffers alive); every step then checks that nothing they came from changed:

- nothing registered since, anywhere (`module.weight = ...`, a replaced submodule, `quantize()`,
  `load_state_dict(assign=True)`): one counter, kept by torch's global registration hooks;
- every parameter still its module's (also catches `module._parameters[name] = ...`, as accelerate writes it);
- no forward hook registered since, anywhere (torch's hook-handle counter; when it moved, every module's hooks
  are looked at again), no global forward hook, no forward replaced on an instance (accelerate's hooks);
- the attributes the step reads (the blocks' and the final LayerNorm's `eps`, an embedding's `max_norm`) unchanged;
- the cache's buffers unchanged, and the grad and inference modes the same (the cache's views depend on them).

The kernel backend (`config.kernel_backend`, `GLM_KERNELS_BACKEND`) is resolved when the plan is made, once per
cache: a backend asked for in the middle of a generation applies from the next one.

What each step reads from the tensors themselves (device, dtype, a gradient needed) `_C.step_infer` checks before
it writes anything, and declines: the model then runs its forward, and gathers anew at the next step.
"""
from __future__ import annotations

from itertools import repeat

import torch
from torch.nn.modules import module as module_mod
from torch.utils.hooks import RemovableHandle

# parameters, buffers and submodules registered in this process since the hooks below were installed
_REGISTERED = [0]
_INSTALLED = []


def _registered(*_):
    _REGISTERED[0] += 1  # returns None: the registered object stays as it is


def _install() -> None:
    """Torch's global registration hooks, installed once, at the first plan (not at import)."""
    if not _INSTALLED:
        _INSTALLED.extend(register(_registered) for register in (
            module_mod.register_module_parameter_registration_hook,
            module_mod.register_module_buffer_registration_hook,
            module_mod.register_module_module_registration_hook))


def global_forward_hooks() -> bool:
    """Whether torch has global forward hooks (`register_module_forward_hook` / `..._pre_hook`)."""
    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _handles():
    """Hook handles made so far in this process (every forward hook registration makes one), or None."""
    return getattr(RemovableHandle, "next_id", None)


def _modes():
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


class StepPlan:
    """`ops.step_args(...)` of `model` (a `ChatGLMForConditionalGeneration`) over `cache`, with what they came
    from. `holds(model)`: whether they may be used for this step of `model` over the same cache."""

    __slots__ = ("args", "model", "registered", "handles", "module_dicts", "hook_dicts", "params", "attrs",
                 "buffers", "modes")

    def __init__(self, model, cache, args):
        _install()
        self.args, self.model = args, model
        self.registered, self.handles, self.modes = _REGISTERED[0], _handles(), _modes()
        modules = list(model.modules())
        # hooks of the model itself run around its forward as ever: only its submodules' calls are skipped
        self.module_dicts = tuple(m.__dict__ for m in modules[1:])
        self.hook_dicts = tuple(d for m in modules[1:] for d in (m._forward_hooks, m._forward_pre_hooks))
        # per module with parameters: its `_parameters`, the ids of their values and the values (held, so that no
        # other object takes one of their ids while the plan lives)
        self.params = tuple((m._parameters, list(map(id, m._parameters.values())), tuple(m._parameters.values()))
                            for m in modules if m._parameters)
        # the plain attributes the step reads: each block's eps, the final LayerNorm's, an nn.Embedding's max_norm
        read = [(layer, "eps") for layer in model.transformer.layers] + \
            [(model.transformer.final_layernorm, "eps"), (model.transformer.word_embeddings, "max_norm")]
        self.attrs = tuple((m.__dict__, k, m.__dict__[k]) for m, k in read if k in m.__dict__)
        self.buffers = tuple((layer, layer.keys, layer.values) for layer in cache.layers)

    def holds(self, model) -> bool:
        # cheapest first; each reads only the plan's own tuples and the dicts they name
        if model is not self.model or self.registered != _REGISTERED[0] or self.modes != _modes() or \
                global_forward_hooks():
            return False
        handles = _handles()
        if handles is None or handles != self.handles:
            if any(self.hook_dicts):
                return False
            self.handles = handles
        return not any(map(dict.__contains__, self.module_dicts, repeat("forward"))) and \
            all(list(map(id, d.values())) == ids for d, ids, _ in self.params) and \
            all(d.get(k) == v for d, k, v in self.attrs) and \
            all(layer.keys is k and layer.values is v for layer, k, v in self.buffers)
