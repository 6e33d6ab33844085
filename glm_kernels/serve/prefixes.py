"""P-Tuning v2 prefixes served over one base model: loaded once, kept as per-layer keys and values.

A prefix is only extra keys and values in front of every layer's attention, so the server computes
each one once at start (`PrefixEncoder.key_values`) and copies it into a request's rows of the KV
cache; the base weights are shared by every prefix.

    --ptuning NAME=DIR      DIR: a checkpoint `glm-kernels ptune` or THUDM's trainer wrote
                            (`pytorch_model.bin` or `model.safetensors` with
                            `transformer.prefix_encoder.*`, and the `config.json` saved beside it)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading import load_prefix_encoder, ptuning_settings
from ..modeling import PrefixEncoder

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass
class Prefix:
    """A served prefix: its name, length and per-layer `[2, P, 1, nh, hd]` keys and values (None for P = 0)."""

    name: str
    length: int
    key_values: list[torch.Tensor] | None
    source: str = ""


def parse_ptuning_arg(text: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR); a clear ValueError otherwise."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--ptuning {text!r}: expected NAME=DIR (e.g. --ptuning adgen=output/adgen-pt-128)")
    if not NAME.match(name):
        raise ValueError(f"--ptuning {text!r}: the name {name!r} must start with a letter or digit and hold only "
                         "letters, digits and . _ : / - (it is the `model` clients ask for)")
    return name, Path(directory)


def _prefix_config(base_config, directory: Path, pre_seq_len: int | None):
    """The base config with the checkpoint's `pre_seq_len` / `prefix_projection`; a checkpoint trained on a
    model of another shape is refused."""
    settings = ptuning_settings(directory, pre_seq_len)
    for field in ("num_layers", "hidden_size", "num_attention_heads"):
        if field in settings and settings[field] != getattr(base_config, field):
            raise ValueError(f"{directory} was trained on a model with {field}={settings[field]}, the base model has "
                             f"{field}={getattr(base_config, field)}")
    return base_config.__class__.from_dict({**base_config.to_dict(), "pre_seq_len": settings["pre_seq_len"],
                                            "prefix_projection": settings["prefix_projection"]})


def load_prefix(name: str, directory, model, pre_seq_len: int | None = None) -> Prefix:
    """Load a P-Tuning checkpoint for `model` (the base) and compute its keys and values once.

    `pre_seq_len`: the length to expect (THUDM's `--pre_seq_len`); by default the one in
    `DIR/config.json`. A checkpoint of another length, projection or model shape is refused with
    the reason (nothing is served half-loaded).
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"--ptuning {name}={directory}: {directory} does not exist")
    config = _prefix_config(model.config, directory if directory.is_dir() else directory.parent, pre_seq_len)
    encoder = PrefixEncoder(config)
    try:
        load_prefix_encoder(encoder, directory, config)
    except ValueError as err:
        raise ValueError(f"--ptuning {name}={directory}: {err}") from None
    encoder.to(model.dtype).eval()  # computed as a model of this dtype computes its own prefix
    return Prefix(name, config.pre_seq_len, _key_values(encoder, model), str(directory))


def base_prefix(name: str, model) -> Prefix:
    """The base model's entry: its own prefix encoder's keys and values when it has one, else none."""
    transformer = model.transformer
    if transformer.pre_seq_len is None:
        return Prefix(name, 0, None, "base")
    return Prefix(name, transformer.pre_seq_len, _key_values(transformer.prefix_encoder, model), "base")


def _key_values(encoder, model) -> list[torch.Tensor]:
    """The encoder's per-layer `[2, P, 1, nh, hd]` keys and values, each on its layer's device."""
    with torch.no_grad():
        kv = encoder.key_values(1, "cpu", model.dtype)
    return [t.to(d).contiguous() for t, d in zip(kv, model.transformer.layer_devices())]
