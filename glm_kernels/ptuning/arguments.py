"""Arguments of `glm-kernels ptune`: THUDM's `ptuning/arguments.py` names and defaults, plus transformers'.

`parse_args(argv)` reads three dataclasses with `HfArgumentParser`, exactly as
THUDM's `main.py` does (a single `.json` argument is read as a file of
arguments), so `train.sh` / `evaluate.sh` run with only the program name
changed:

- `ModelArguments`: THUDM's fields, plus `torch_dtype` and `prefix_dropout`.
- `DataTrainingArguments`: THUDM's fields, plus `overlong_rows` and the
  sampling settings the original hard-codes in `evaluate()` / `predict()`
  (`do_sample=True, top_p=0.7, temperature=0.95`).
- `PTuningTrainingArguments`: transformers' `Seq2SeqTrainingArguments`, plus
  `overwrite_output_dir` (removed in transformers 5, still passed by THUDM's
  scripts).

Fields THUDM declares but its `main.py` never reads (`lang`,
`forced_bos_token`, `resize_position_embeddings`, `use_fast_tokenizer`,
`pad_to_max_length` of the eval sets is used here) are accepted with the same
effect as there; each says so in its help.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

DATA_EXTENSIONS = ("json", "jsonl", "csv")


class UsageError(ValueError):
    """Arguments that cannot run together (or name missing things); the message says which."""


@dataclass
class ModelArguments:
    """Which base model, prefix and dtype to P-tune (THUDM's `ModelArguments`, plus `torch_dtype`, `prefix_dropout`)."""

    model_name_or_path: str = field(metadata={"help": "Base checkpoint directory (or hub id), e.g. THUDM/chatglm-6b"})
    ptuning_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "P-Tuning v2 checkpoint (prefix encoder only) to load over the base"})
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config directory if not the same as model_name_or_path"})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer directory if not the same as model_name_or_path"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache directory for datasets"})
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Accepted for THUDM's scripts; ChatGLM's tokenizer is SentencePiece only"})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the base model"})
    use_auth_token: bool = field(default=False, metadata={"help": "Use the hub token (private datasets/models)"})
    resize_position_embeddings: Optional[bool] = field(
        default=None, metadata={"help": "Accepted for THUDM's scripts; unused there too (rotary positions)"})
    quantization_bit: Optional[int] = field(
        default=None, metadata={"help": "4 or 8: THUDM's weight-only INT4/INT8 quantization of the frozen base "
                                        "(quantized while loading; the prefix encoder trains through it)"})
    pre_seq_len: Optional[int] = field(default=None, metadata={"help": "P-Tuning v2 prefix length"})
    prefix_projection: bool = field(default=False, metadata={"help": "Encode the prefix through a 2-layer MLP"})
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype of the frozen base: float16, bfloat16 or float32. Default: float16 on CUDA "
                          "(THUDM's model.half()), float32 on the CPU. The prefix encoder always trains in float32.",
                  "choices": ["float16", "bfloat16", "float32"]})
    prefix_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the prefix keys/values while training (the original's 0.1)"})


@dataclass
class DataTrainingArguments:
    """Data and evaluation settings (THUDM's `DataTrainingArguments`, plus `overlong_rows` and sampling)."""

    lang: Optional[str] = field(default=None, metadata={"help": "Accepted for THUDM's scripts; unused there too"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A `datasets` dataset name or directory"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Its configuration name"})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "Column of the prompts (ADGEN: content)"})
    response_column: Optional[str] = field(
        default=None, metadata={"help": "Column of the responses (ADGEN: summary)"})
    history_column: Optional[str] = field(
        default=None, metadata={"help": "Column of the chat history: a list of [query, response] pairs"})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data: JSON lines or CSV"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data: JSON lines or CSV"})
    test_file: Optional[str] = field(default=None, metadata={"help": "Prediction data: JSON lines or CSV"})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the tokenization instead of reusing it"})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes used for tokenization"})
    max_source_length: Optional[int] = field(
        default=1024, metadata={"help": "Longest prompt in tokens (training keeps max_source_length - 1 tokens)"})
    max_target_length: Optional[int] = field(
        default=128, metadata={"help": "Longest response in tokens (training keeps max_target_length - 2 tokens)"})
    val_max_target_length: Optional[int] = field(
        default=None, metadata={"help": "Longest reference response for evaluation (default: max_target_length)"})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every training row to max_source_length + max_target_length (THUDM always does); "
                          "by default rows are padded to the longest row of their batch, which gives the same loss"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training rows"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N evaluation rows"})
    max_predict_samples: Optional[int] = field(
        default=None, metadata={"help": "Use only the first N prediction rows"})
    num_beams: Optional[int] = field(default=None, metadata={"help": "Beams for evaluation/prediction generation"})
    ignore_pad_token_for_loss: bool = field(
        default=True, metadata={"help": "Labels equal to the pad id are ignored by the loss (-100)"})
    source_prefix: Optional[str] = field(default="", metadata={"help": "Text put before every prompt"})
    forced_bos_token: Optional[str] = field(
        default=None, metadata={"help": "Accepted for THUDM's scripts; unused there too"})
    overlong_rows: str = field(
        default="truncate",
        metadata={"help": "Prompts/responses longer than the limits: 'truncate' them as THUDM does (the count and "
                          "the first one are reported) or stop with an 'error' naming file, line and column",
                  "choices": ["truncate", "error"]})
    do_sample: bool = field(
        default=True, metadata={"help": "Sample in evaluation/prediction as the original (False: greedy, "
                                        "reproducible scores)"})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling threshold (the original's 0.7)"})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature (the original's 0.95)"})

    def __post_init__(self):
        if self.dataset_name is None and not (self.train_file or self.validation_file or self.test_file):
            raise UsageError("Need either --dataset_name or a --train_file/--validation_file/--test_file")
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and data_extension(path) not in DATA_EXTENSIONS:
                raise UsageError(f"--{name} {path}: expected a .json/.jsonl (JSON lines) or .csv file")
        for name in ("max_source_length", "max_target_length"):
            value = getattr(self, name)
            if value is None or value < 3:
                raise UsageError(f"--{name} must be at least 3 (room for the special tokens), got {value}")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


@dataclass
class PTuningTrainingArguments(Seq2SeqTrainingArguments):
    """transformers' `Seq2SeqTrainingArguments`, plus `overwrite_output_dir` (gone from transformers 5)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds checkpoints (otherwise refused unless "
                          "--resume_from_checkpoint is given)"})
    ddp_find_unused_parameters: Optional[bool] = field(
        default=False, metadata={"help": "Every prefix-encoder parameter is used in every step: no search (DDP)"})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count input tokens (for tokens/s): no, all or non_padding"})


def data_extension(path: str) -> str:
    return os.path.basename(path).rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataTrainingArguments, PTuningTrainingArguments),
                            prog="glm-kernels ptune")


def parse_args(argv=None) -> tuple[ModelArguments, DataTrainingArguments, PTuningTrainingArguments]:
    """Parse command-line arguments (or one `.json` file of them, as THUDM's main.py does)."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    # Without CUDA the job runs on the CPU; saying so before TrainingArguments sets up its devices is what
    # makes accelerate start gloo DDP under torchrun (otherwise every process trains alone).
    cpu_only = not torch.cuda.is_available()
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(os.path.abspath(argv[0]), encoding="utf-8") as f:
            values = json.load(f)
        if cpu_only:
            values.setdefault("use_cpu", True)
        return p.parse_dict(values)
    if cpu_only and not any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in argv):
        argv += ["--use_cpu", "True"]
    return p.parse_args_into_dataclasses(args=argv)
