"""Data for P-Tuning v2, prepared exactly as THUDM's `ptuning/main.py` prepares it, on HF `datasets`.

Files are JSON lines (`.json`/`.jsonl`; a top-level JSON array also works) or
CSV. Every file is checked before anything else happens (and before anything
is written to `output_dir`): existence, emptiness, UTF-8, JSON syntax, the
prompt/response/history columns and their types. Errors name the file, the
line and the column. Then `datasets.load_dataset` loads them and `map`
tokenizes them (cached; `--overwrite_cache` redoes it).

Training rows (THUDM's `preprocess_function_train`):

    a = encode(source_prefix + prompt)[: max_source_length - 1]
    b = encode(response)[: max_target_length - 2]
    input_ids = a + [gMASK, <sop>] + b + [<eop>]
    labels    = [-100] * len(a + [gMASK]) + [<sop>] + b + [<eop>]

(labels equal to the pad id are also -100 with `ignore_pad_token_for_loss`).
THUDM pads every row to `max_source_length + max_target_length`; here the
collator pads to the longest row of the batch (right padding after `<eop>`,
labels -100), which gives the same loss because the GLM mask is causal after
`<sop>`; `--pad_to_max_length` restores the fixed width.

Evaluation rows (`preprocess_function_eval`): `input_ids =
tokenizer(source_prefix + prompt, max_length=max_source_length,
truncation=True)` (the prompt keeps `max_source_length - 2` tokens, then
`[gMASK] <sop>`), `labels = tokenizer(text_target=response,
max_length=val_max_target_length, truncation=True)` (used only to score the
generated text); batches are left-padded for generation.

Chat data: with `--history_column`, the history (a list of `[query,
response]` pairs) and the query become `[Round i]\\n问：...\\n答：...` rounds,
the prompt `chat()` builds. One deliberate difference: THUDM's training
function wraps a query with an *empty* history as `[Round 0]\\n问：q\\n答：`
while its evaluation function and `chat()` send the bare query; here training
uses the bare query too, so the prefix is trained on what `chat()` sends.

Rows whose prompt or response is empty or missing are skipped, as the
original skips them (the count and the first one are reported).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..generation import build_prompt
from .arguments import DataTrainingArguments, data_extension

logger = logging.getLogger(__name__)

SPLIT_ARGUMENTS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


class DataError(ValueError):
    """Bad data: the message names the file, the line and the column."""


@dataclass
class SplitSource:
    """Where the rows of one split come from: the file and the line of every row (1-based)."""

    path: str
    argument: str
    lines: list[int] = field(default_factory=list)

    def where(self, row: int, column: str | None = None) -> str:
        line = self.lines[row] if 0 <= row < len(self.lines) else None
        place = f"{self.path} line {line}" if line is not None else f"{self.path} row {row + 1}"
        return place + (f", column {column!r}" if column else "")


# ------------------------------------------------------------------ file checks


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        column = _column_of_bad_bytes(raw[line_start:raw.find(b"\n", err.start) if b"\n" in raw[err.start:]
                                          else len(raw)])
        where = f"{path} line {line}" + (f", column {column!r}" if column else "")
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start - line_start + 1} "
                        f"of the line); save the file as UTF-8") from None


def _column_of_bad_bytes(line: bytes) -> str | None:
    """The JSON key (or CSV column index) whose value holds the undecodable bytes, when it can be told."""
    text = line.decode("utf-8", errors="surrogateescape")
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if any("\udc80" <= ch <= "\udcff" for ch in json.dumps(value, ensure_ascii=False)):
                return key
    return None


def _json_rows(path: str, text: str) -> list[tuple[int, object]]:
    """`(line, row)` of a JSON-lines file (blank lines skipped, as `datasets` skips them) or a JSON array."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg}, character {err.colno})") from None
        # A JSON array has no line per row: report rows by their 1-based position.
        return [(None, row) for row in rows]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: not valid JSON ({err.msg}, character {err.colno}); the file "
                            "must hold one JSON object per line") from None
    return out


def _csv_rows(path: str, text: str) -> list[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(text))
    out = []
    try:
        for row in reader:
            out.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None
    return out


def read_rows(path: str, argument: str) -> tuple[list[tuple[int, object]], list[str]]:
    """Check one data file and return its `(line, row)` pairs and its column names."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--{argument} {path}: no such file")
    raw = p.read_bytes()
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(f"--{argument} {path} is empty: no rows")
    rows = _csv_rows(path, text) if data_extension(path) == "csv" else _json_rows(path, text)
    if not rows:
        raise DataError(f"--{argument} {path} has a header but no rows")
    columns: list[str] = []
    for line, row in rows:
        if not isinstance(row, dict):
            where = f"{path} line {line}" if line is not None else f"{path} row {rows.index((line, row)) + 1}"
            raise DataError(f"{where}: expected a JSON object with the data columns, got {type(row).__name__}")
        for key in row:
            if key not in columns:
                columns.append(key)
    return rows, columns


def _check_text(value, where: str, argument: str) -> None:
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: expected text for {argument}, got {type(value).__name__} {str(value)[:40]!r}")


def _check_history(value, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in value):
        raise DataError(f"{where}: the history must be a list of [query, response] pairs of text, got "
                        f"{json.dumps(value, ensure_ascii=False)[:80]}")


def check_split(path: str, argument: str, data_args: DataTrainingArguments) -> SplitSource:
    """Validate one split's file for the configured columns; return where each of its rows sits."""
    rows, columns = read_rows(path, argument)
    wanted = [("prompt_column", data_args.prompt_column), ("response_column", data_args.response_column)]
    if data_args.history_column is not None:
        wanted.append(("history_column", data_args.history_column))
    for flag, column in wanted:
        if column is None:
            raise DataError(f"--{flag} is required (the column of {path} holding the "
                            f"{flag.split('_')[0]}s; columns found: {', '.join(columns)})")
        if column not in columns:
            raise DataError(f"{path}: column {column!r} (--{flag}) not found; the file has columns "
                            f"{', '.join(repr(c) for c in columns)}")
    if data_args.history_column is not None and data_extension(path) == "csv":
        raise DataError(f"{path}: --history_column needs JSON lines (a list of [query, response] pairs per row); "
                        "a CSV cell holds only text")
    for index, (line, row) in enumerate(rows):
        for flag, column in wanted:
            where = (f"{path} line {line}" if line is not None else f"{path} row {index + 1}") + f", column {column!r}"
            if flag == "history_column":
                _check_history(row.get(column), where)
            else:
                _check_text(row.get(column), where, f"--{flag}")
    return SplitSource(path=path, argument=argument, lines=[line for line, _ in rows])


# ------------------------------------------------------------------ loading


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None = None, use_auth_token: bool = False):
    """Check the data files, then load them with `datasets`; returns `(DatasetDict, {split: SplitSource})`."""
    from datasets import load_dataset

    sources: dict[str, SplitSource] = {}
    data_files = {}
    for split, argument in SPLIT_ARGUMENTS.items():
        path = getattr(data_args, argument)
        if path is None:
            continue
        sources[split] = check_split(path, argument, data_args)
        data_files[split] = path
    if data_files:
        extensions = {("csv" if data_extension(p) == "csv" else "json") for p in data_files.values()}
        if len(extensions) > 1:
            raise DataError(f"data files mix CSV and JSON ({', '.join(data_files.values())}); use one format")
        raw = load_dataset(extensions.pop(), data_files=data_files, cache_dir=cache_dir)
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir,
                           token=True if use_auth_token else None)
        for split in raw:
            for column in (data_args.prompt_column, data_args.response_column, data_args.history_column):
                if column is not None and column not in raw[split].column_names:
                    raise DataError(f"dataset {data_args.dataset_name} split {split!r}: column {column!r} not "
                                    f"found; it has {', '.join(raw[split].column_names)}")
            sources[split] = SplitSource(path=f"{data_args.dataset_name}[{split}]", argument="dataset_name")
    return raw, sources


# ------------------------------------------------------------------ tokenization


def _prompts(examples, data_args: DataTrainingArguments):
    """`(row index, prompt, response)` of the rows the original keeps (non-empty prompt and response)."""
    prompts, responses = examples[data_args.prompt_column], examples[data_args.response_column]
    histories = examples[data_args.history_column] if data_args.history_column else [None] * len(prompts)
    prefix = data_args.source_prefix or ""
    for i, (query, response, history) in enumerate(zip(prompts, responses, histories)):
        if query and response:
            yield i, prefix + build_prompt(query, history), response


def train_features(tokenizer, data_args: DataTrainingArguments):
    """The batched `map` function for training rows (see the module docstring)."""

    def features(examples, indices):
        out = {"input_ids": [], "labels": [], "row": [], "prompt_tokens": [], "response_tokens": []}
        for i, prompt, response in _prompts(examples, data_args):
            a_ids = tokenizer.encode(text=prompt, add_special_tokens=False)
            b_ids = tokenizer.encode(text=response, add_special_tokens=False)
            out["prompt_tokens"].append(len(a_ids))
            out["response_tokens"].append(len(b_ids))
            a_ids = a_ids[: data_args.max_source_length - 1]
            b_ids = b_ids[: data_args.max_target_length - 2]
            input_ids = tokenizer.build_inputs_with_special_tokens(a_ids, b_ids)
            context_length = input_ids.index(tokenizer.bos_token_id)
            labels = [-100] * context_length + input_ids[context_length:]
            if data_args.ignore_pad_token_for_loss:
                labels = [(t if t != tokenizer.pad_token_id else -100) for t in labels]
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["row"].append(indices[i])
        return out

    return features


def eval_features(tokenizer, data_args: DataTrainingArguments):
    """The batched `map` function for evaluation/prediction rows (see the module docstring)."""

    def features(examples, indices):
        out = {"input_ids": [], "labels": [], "row": [], "prompt_tokens": [], "response_tokens": []}
        for i, prompt, response in _prompts(examples, data_args):
            input_ids = tokenizer(prompt, max_length=data_args.max_source_length, truncation=True)["input_ids"]
            labels = tokenizer(text_target=response, max_length=data_args.val_max_target_length,
                               truncation=True)["input_ids"]
            if data_args.ignore_pad_token_for_loss:
                labels = [(t if t != tokenizer.pad_token_id else -100) for t in labels]
            out["prompt_tokens"].append(len(tokenizer.encode(text=prompt, add_special_tokens=False)))
            out["response_tokens"].append(len(tokenizer.encode(text=response, add_special_tokens=False)))
            out["input_ids"].append(list(input_ids))
            out["labels"].append(list(labels))
            out["row"].append(indices[i])
        return out

    return features


def _limits(data_args: DataTrainingArguments, training: bool) -> tuple[int, int]:
    """Tokens of prompt and response kept (special tokens excluded)."""
    if training:
        return data_args.max_source_length - 1, data_args.max_target_length - 2
    return data_args.max_source_length - 2, data_args.val_max_target_length - 2


def check_lengths(dataset, source: SplitSource, data_args: DataTrainingArguments, training: bool, split: str,
                  total_rows: int) -> dict:
    """Report (or, with `--overlong_rows error`, refuse) prompts and responses beyond the limits.

    Returns a summary for the log: rows read, kept, skipped, truncated.
    """
    prompt_limit, response_limit = _limits(data_args, training)
    rows = dataset["row"]
    summary = {"rows": total_rows, "kept": len(rows), "skipped_empty": total_rows - len(rows)}
    if summary["skipped_empty"]:
        kept = set(rows)
        first = next(i for i in range(total_rows) if i not in kept)
        logger.warning("%s: %d row(s) with an empty prompt or response skipped, as the original does (first: %s)",
                       split, summary["skipped_empty"], source.where(first))
    for column, limit, flag in (("prompt_tokens", prompt_limit, "max_source_length"),
                                ("response_tokens", response_limit,
                                 "max_target_length" if training else "val_max_target_length")):
        lengths = dataset[column]
        over = [i for i, n in enumerate(lengths) if n > limit]
        summary[f"{column.split('_')[0]}s_truncated"] = len(over)
        if not over:
            continue
        first = over[0]
        name = data_args.prompt_column if column == "prompt_tokens" else data_args.response_column
        where = source.where(rows[first], name)
        message = (f"{where}: {lengths[first]} tokens, over the limit of {limit} (--{flag} "
                   f"{getattr(data_args, flag)})")
        if data_args.overlong_rows == "error":
            more = f" ({len(over)} such rows in {split})" if len(over) > 1 else ""
            raise DataError(message + more + "; raise the limit or pass --overlong_rows truncate")
        logger.warning("%s: %d of %d %ss truncated to %d tokens, as the original does (first: %s)", split,
                       len(over), len(lengths), name, limit, message)
    return summary


def tokenize_split(raw_split, source: SplitSource, tokenizer, data_args: DataTrainingArguments, training: bool,
                   split: str, main_process_first=None):
    """Tokenize one split with `datasets.map`; returns `(dataset with input_ids/labels, summary)`."""
    import contextlib

    function = train_features(tokenizer, data_args) if training else eval_features(tokenizer, data_args)
    context = main_process_first(desc=f"{split} dataset map pre-processing") if main_process_first else \
        contextlib.nullcontext()
    with context:
        dataset = raw_split.map(
            function,
            batched=True,
            with_indices=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=raw_split.column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Running tokenizer on {split} dataset",
        )
    summary = check_lengths(dataset, source, data_args, training, split, len(raw_split))
    if len(dataset) == 0:
        raise DataError(f"{source.path}: no usable rows (every row has an empty prompt or response)")
    return dataset.remove_columns(["row", "prompt_tokens", "response_tokens"]), summary


# ------------------------------------------------------------------ batching


def _padded(rows: list, width: int, fill: int, left: bool = False) -> torch.Tensor:
    """`[len(rows), width]` int64: each row's values on the right (`left=True`: on the left), `fill` elsewhere."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            target = out[i, width - len(row):] if left else out[i, :len(row)]
            target.copy_(torch.as_tensor(row))
    return out


@dataclass
class TrainCollator:
    """Right-pads training rows to the longest of the batch (or to a fixed width): ids with pad, labels with -100."""

    pad_token_id: int
    fixed_length: int | None = None

    def __call__(self, features):
        width = self.fixed_length or max(len(f["input_ids"]) for f in features)
        return {"input_ids": _padded([f["input_ids"] for f in features], width, self.pad_token_id),
                "labels": _padded([f["labels"] for f in features], width, -100)}


@dataclass
class GenerationCollator:
    """Left-pads prompts for batched generation (2D padding mask); labels right-padded with -100."""

    pad_token_id: int

    def __call__(self, features):
        prompts = [f["input_ids"] for f in features]
        width = max(len(p) for p in prompts)
        return {"input_ids": _padded(prompts, width, self.pad_token_id, left=True),
                "attention_mask": _padded([[1] * len(p) for p in prompts], width, 0, left=True),
                "labels": _padded([f["labels"] for f in features], max(len(f["labels"]) for f in features), -100)}
