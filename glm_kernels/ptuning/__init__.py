"""P-Tuning v2 as a product: `glm-kernels ptune` (THUDM's ptuning/main.py, on transformers' Trainer).

    from glm_kernels.ptuning import main, run, parse_args
    main(["--do_train", "--train_file", "train.json", ...])          # the command line, from Python
    run(*parse_args([...]))                                          # same, returns the metrics

Modules: `arguments` (THUDM's argument names and defaults), `data` (file
checks, tokenization exactly as THUDM, collators), `trainer` (prefix-only,
atomic checkpoints; generation for evaluation), `metrics` (BLEU-4, ROUGE),
`callbacks` (progress bar, JSONL log, loss curve), `main` (the job),
`demo` (the `make demo` job on the shipped assets).
"""
from .arguments import DataTrainingArguments, ModelArguments, PTuningTrainingArguments, UsageError, parse_args
from .data import DataError
from .main import main, run

__all__ = [
    "DataError",
    "DataTrainingArguments",
    "ModelArguments",
    "PTuningTrainingArguments",
    "UsageError",
    "main",
    "parse_args",
    "run",
]
