"""`glm-kernels ptune`: THUDM's `ptuning/main.py` job (train / evaluate / predict) on glm_kernels.

    glm-kernels ptune --do_train --train_file AdvertiseGen/train.json --prompt_column content \\
        --response_column summary --model_name_or_path THUDM/chatglm-6b --output_dir out \\
        --max_source_length 64 --max_target_length 64 --pre_seq_len 128 --learning_rate 2e-2 ...
    torchrun --nproc_per_node 2 -m glm_kernels.ptuning ...        # several processes (DDP)

From Python: `run(model_args, data_args, training_args)` with the dataclasses of
`glm_kernels.ptuning.arguments`, or `main(argv)` with a list of arguments.

Order of work: arguments are checked, then the config and tokenizer are read,
then every data file is validated and tokenized; only then is the base model
loaded and anything written to `output_dir`.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import torch

from .arguments import DataTrainingArguments, ModelArguments, PTuningTrainingArguments, UsageError, parse_args
from .data import DataError, GenerationCollator, TrainCollator, load_raw_datasets, tokenize_split

logger = logging.getLogger("glm_kernels.ptuning")

PREDICTIONS_FILE = "generated_predictions.txt"
ORIGINAL_GENERATION_MAX_LENGTH = 512  # THUDM's main.py passes max_length=512 to evaluate() and predict()


def _base_dtype(model_args: ModelArguments, training_args: PTuningTrainingArguments) -> torch.dtype:
    if model_args.torch_dtype is not None:
        return getattr(torch, model_args.torch_dtype)
    on_gpu = torch.cuda.is_available() and not training_args.use_cpu
    return torch.float16 if on_gpu else torch.float32


def check_arguments(model_args: ModelArguments, data_args: DataTrainingArguments,
                    training_args: PTuningTrainingArguments) -> None:
    """Refuse combinations that cannot run, before anything is loaded or written."""
    if model_args.quantization_bit is not None and model_args.quantization_bit not in (4, 8):
        raise UsageError(f"--quantization_bit {model_args.quantization_bit}: weight-only quantization takes 4 or 8 "
                         "(THUDM's INT4 / INT8)")
    if training_args.do_train and model_args.pre_seq_len is None:
        raise UsageError("--do_train needs --pre_seq_len: glm-kernels ptune trains a P-Tuning v2 prefix over a "
                         "frozen base (full fine-tuning is not supported)")
    if model_args.ptuning_checkpoint is not None and model_args.pre_seq_len is None:
        raise UsageError("--ptuning_checkpoint needs --pre_seq_len (the prefix length it was trained with)")
    if not 0 <= model_args.prefix_dropout < 1:
        raise UsageError(f"--prefix_dropout must be in [0, 1), got {model_args.prefix_dropout}")
    needed = {"do_train": ("train", "train_file"), "do_eval": ("validation", "validation_file"),
              "do_predict": ("test", "test_file")}
    if data_args.dataset_name is None:
        for flag, (_, argument) in needed.items():
            if getattr(training_args, flag) and getattr(data_args, argument) is None:
                raise UsageError(f"--{flag} needs --{argument}")


def check_output_dir(training_args: PTuningTrainingArguments) -> None:
    """Training into a directory that already holds checkpoints needs --overwrite_output_dir or a resume."""
    from transformers.trainer_utils import get_last_checkpoint

    out = training_args.output_dir
    if not training_args.do_train or not os.path.isdir(out):
        return
    last = get_last_checkpoint(out)
    if last is not None and not training_args.overwrite_output_dir and training_args.resume_from_checkpoint is None:
        raise UsageError(f"--output_dir {out} already holds checkpoints ({os.path.basename(last)}): pass "
                         f"--resume_from_checkpoint {last} to continue that run, or --overwrite_output_dir")


def _resume_path(training_args: PTuningTrainingArguments):
    from transformers.trainer_utils import get_last_checkpoint

    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if str(resume).lower() in ("true", "latest", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no checkpoint-N in {training_args.output_dir}")
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    return resume


def prepare_data(tokenizer, config, data_args: DataTrainingArguments, training_args: PTuningTrainingArguments,
                 model_args: ModelArguments):
    """Validate and tokenize the splits the job needs; returns `{split: dataset}` and `{split: summary}`."""
    limit = config.max_sequence_length
    if training_args.do_train and data_args.max_source_length + data_args.max_target_length > limit:
        raise UsageError(f"--max_source_length {data_args.max_source_length} + --max_target_length "
                         f"{data_args.max_target_length} exceeds the model's max_sequence_length={limit}")
    raw, sources = load_raw_datasets(data_args, cache_dir=model_args.cache_dir,
                                     use_auth_token=model_args.use_auth_token)
    plan = []  # (split, the flag that needs it, rows laid out for training?, row limit)
    if training_args.do_train:
        plan.append(("train", "do_train", True, data_args.max_train_samples))
    if training_args.do_eval:
        # Without generation, evaluation is the teacher-forced loss: rows laid out as for training.
        plan.append(("validation", "do_eval", not training_args.predict_with_generate, data_args.max_eval_samples))
    if training_args.do_predict:
        plan.append(("test", "do_predict", False, data_args.max_predict_samples))
    datasets, summaries = {}, {}
    for split, flag, training_layout, max_samples in plan:
        if split not in raw:
            raise DataError(f"--{flag} needs a {split} split; the data has {', '.join(raw)}")
        rows = raw[split]
        if max_samples is not None:
            rows = rows.select(range(min(len(rows), max_samples)))
        datasets[split], summaries[split] = tokenize_split(
            rows, sources[split], tokenizer, data_args, training_layout, split,
            main_process_first=training_args.main_process_first)
    return datasets, summaries


def _log_example(tokenizer, split: str, example: dict) -> None:
    labels = [t for t in example["labels"] if t != -100]
    logger.info("%s example: input_ids %s\n  inputs: %s\n  labels: %s", split, example["input_ids"],
                tokenizer.decode(example["input_ids"]), tokenizer.decode(labels))


def load_model(model_args: ModelArguments, training_args: PTuningTrainingArguments, config_dir: str):
    from ..modeling import ChatGLMForConditionalGeneration

    overrides = {}
    if model_args.pre_seq_len is not None:
        overrides = {"pre_seq_len": model_args.pre_seq_len, "prefix_projection": model_args.prefix_projection}
    if model_args.quantization_bit is not None:
        # THUDM's main.py quantizes the loaded model (model.quantize(bits)); here the base is quantized shard by
        # shard while it loads, never held whole in 16 bits. A checkpoint already quantized keeps its own layout.
        overrides["quantization_bit"] = model_args.quantization_bit
    config = None
    if model_args.config_name is not None:
        from ..configuration import ChatGLMConfig

        config = ChatGLMConfig.from_pretrained(config_dir)
    model = ChatGLMForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path, config=config, torch_dtype=_base_dtype(model_args, training_args),
        ptuning_checkpoint=model_args.ptuning_checkpoint, **overrides)
    if model_args.pre_seq_len is not None:
        # THUDM's recipe: a half-precision base, the prefix encoder in float32 (what the optimizer updates).
        model.transformer.prefix_encoder.float()
        model.transformer.dropout.p = model_args.prefix_dropout
    return model


def generation_kwargs(config, data_args: DataTrainingArguments, training_args: PTuningTrainingArguments) -> dict:
    """What `generate()` gets in evaluation and prediction: the original's sampling, or greedy."""
    max_length = training_args.generation_max_length or min(ORIGINAL_GENERATION_MAX_LENGTH,
                                                            config.max_sequence_length)
    if max_length > config.max_sequence_length:
        raise UsageError(f"--generation_max_length {max_length} exceeds the model's max_sequence_length="
                         f"{config.max_sequence_length}")
    kwargs = {"max_length": max_length, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
              "num_beams": data_args.num_beams or training_args.generation_num_beams or 1}
    if data_args.do_sample:
        kwargs.update(do_sample=True, top_p=data_args.top_p, temperature=data_args.temperature)
    else:
        kwargs.update(do_sample=False)
    return kwargs


def write_predictions(path: str, predictions: list[str], references: list[str]) -> None:
    """THUDM's `generated_predictions.txt`: one JSON object `{"labels": ..., "predict": ...}` per line (atomic)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for prediction, reference in zip(predictions, references):
            f.write(json.dumps({"labels": reference, "predict": prediction}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(model_args: ModelArguments, data_args: DataTrainingArguments,
        training_args: PTuningTrainingArguments) -> dict:
    """Run the job; returns the metrics of each phase (`train`, `eval`, `predict`)."""
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from ..configuration import ChatGLMConfig
    from ..tokenization import ChatGLMTokenizer, check_tokenizer_matches
    from .callbacks import LOSS_CURVE_FILE, METRICS_FILE, JsonlLogCallback, LossCurveCallback, PTuneProgressCallback
    from .metrics import decode_for_metrics, make_compute_metrics
    from .trainer import PTuningTrainer

    check_arguments(model_args, data_args, training_args)
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin for; torch warns on every dataloader
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        logger.info("There is nothing to do. Please pass --do_train, --do_eval and/or --do_predict.")
        return {}
    set_seed(training_args.seed)
    config_dir = model_args.config_name or model_args.model_name_or_path
    config = ChatGLMConfig.from_pretrained(config_dir)
    tokenizer = ChatGLMTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    check_tokenizer_matches(tokenizer, config)
    kwargs = generation_kwargs(config, data_args, training_args) if (
        training_args.do_eval or training_args.do_predict) and training_args.predict_with_generate else {}
    resume = _resume_path(training_args) if training_args.do_train else None
    check_output_dir(training_args)
    datasets, summaries = prepare_data(tokenizer, config, data_args, training_args, model_args)
    for split, summary in summaries.items():
        logger.info("%s: %s", split, summary)
        _log_example(tokenizer, split, datasets[split][0])

    # The data is known good: from here on the base model is loaded and output_dir written.
    try:
        model = load_model(model_args, training_args, config_dir)
    except ValueError as err:  # e.g. a P-Tuning checkpoint of another pre_seq_len: the message says which
        raise UsageError(str(err)) from err
    fixed = data_args.max_source_length + data_args.max_target_length if data_args.pad_to_max_length else None
    trainer = PTuningTrainer(
        model=model, args=training_args, train_dataset=datasets.get("train"),
        eval_dataset=datasets.get("validation"), processing_class=tokenizer,
        data_collator=TrainCollator(tokenizer.pad_token_id, fixed),
        generation_collator=GenerationCollator(tokenizer.pad_token_id),
        compute_metrics=make_compute_metrics(tokenizer) if training_args.predict_with_generate else None,
        generation_kwargs=kwargs)
    if not training_args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(PTuneProgressCallback())
    trainer.add_callback(JsonlLogCallback(os.path.join(training_args.output_dir, METRICS_FILE)))
    trainer.add_callback(LossCurveCallback(os.path.join(training_args.output_dir, LOSS_CURVE_FILE)))

    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        metrics = dict(train_result.metrics, train_samples=len(datasets["train"]))
        trainer.save_model()  # the final prefix, in output_dir (THUDM keeps only the checkpoints)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(datasets["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
    if training_args.do_predict:
        output = trainer.predict(datasets["test"], metric_key_prefix="predict")
        metrics = dict(output.metrics or {}, predict_samples=len(datasets["test"]))
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        results["predict"] = metrics
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            predictions = decode_for_metrics(tokenizer, output.predictions)
            references = decode_for_metrics(tokenizer, output.label_ids)
            os.makedirs(training_args.output_dir, exist_ok=True)
            write_predictions(os.path.join(training_args.output_dir, PREDICTIONS_FILE), predictions, references)
    return results


def main(argv=None) -> int:
    """Command-line entry: parse THUDM's arguments and run; bad arguments or data exit with status 2."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    logger.setLevel(logging.INFO)
    try:
        model_args, data_args, training_args = parse_args(argv)
        if not training_args.should_log:
            logger.setLevel(logging.WARNING)
        run(model_args, data_args, training_args)
    except (UsageError, DataError, FileNotFoundError) as err:
        print(f"glm-kernels ptune: error: {err}", file=sys.stderr)
        return 2
    return 0
