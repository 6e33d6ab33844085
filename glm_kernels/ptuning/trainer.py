"""`PTuningTrainer`: transformers' `Trainer` (with `Seq2SeqTrainingArguments`) for P-Tuning v2 of ChatGLM.

What it changes, and why:

- **Checkpoints hold only the prefix encoder**, as THUDM's trainer saves them:
  `pytorch_model.bin` with the `transformer.prefix_encoder.*` keys (fp32),
  `config.json`, the tokenizer files and `training_args.bin`; the optimizer,
  scheduler, RNG and trainer state are transformers' own files, so
  `--resume_from_checkpoint` continues the same run. THUDM's
  `--ptuning_checkpoint` loader reads the `pytorch_model.bin` as it is.
- **Checkpoints are atomic**: everything is written into
  `tmp-checkpoint-N/`, flushed to disk, and renamed to `checkpoint-N/` in one
  step (after every process has written its part). A run killed while saving
  leaves the previous checkpoint intact and no half-written `checkpoint-N`
  (transformers' `get_last_checkpoint` ignores the `tmp-` directory, and the
  next save removes it).
- **Resuming** loads the prefix with `load_ptuning_checkpoint` (shapes and
  `pre_seq_len` checked, with a message that says which is wrong).
- **Evaluation with generation** runs `model.generate()` over left-padded
  batches (the preallocated GLM cache, each row stops at `<eop>`), returns
  only the new tokens and scores them with `compute_metrics`. Across
  processes the rows are gathered with `gather_for_metrics`, which drops the
  rows the distributed sampler repeats to even out the last batch
  (`Seq2SeqTrainer` gathers them too, so its metrics count them). Without
  `--predict_with_generate`, evaluation reports the teacher-forced loss only
  (full logits are never gathered).
"""
from __future__ import annotations

import contextlib
import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from ..loading import PREFIX_KEY, load_ptuning_checkpoint

WEIGHTS_NAME = "pytorch_model.bin"


def prefix_state_dict(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The prefix encoder's tensors under THUDM's names `transformer.prefix_encoder.*`, on the CPU.

    `state_dict` (a full one, as DeepSpeed/FSDP gather it) is filtered when given.
    """
    if state_dict is None:
        base = getattr(model, model.base_model_prefix)
        state_dict = {PREFIX_KEY + k: v for k, v in base.prefix_encoder.state_dict().items()}
    out = {}
    for key, value in state_dict.items():
        marker = key.find("prefix_encoder.")
        if marker >= 0:
            out[PREFIX_KEY + key[marker + len("prefix_encoder."):]] = value.detach().contiguous().cpu()
    if not out:
        raise ValueError("the model has no prefix encoder to save (config.pre_seq_len is None)")
    return out


def atomic_torch_save(obj, path: str) -> None:
    """`torch.save` to a temporary file in the same directory, flushed, then renamed over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_directory(staging: str, final: str) -> None:
    """Make `staging` appear as `final` in one rename (an existing `final` is replaced)."""
    parent = os.path.dirname(final) or "."
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, f"tmp-replaced-{os.path.basename(final)}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(staging, final)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old)


class PTuningTrainer(Trainer):
    """`Trainer` that saves/loads only the prefix encoder, atomically, and evaluates by generation.

    Extra arguments: `generation_collator` (batches for generation: left-padded
    prompts and a 2D mask) and `generation_kwargs` (what `generate()` gets in
    evaluation and prediction: `max_length`, `do_sample`, `top_p`,
    `temperature`, `num_beams`).
    """

    def __init__(self, *args, generation_collator=None, generation_kwargs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_collator = generation_collator
        self.generation_kwargs = dict(generation_kwargs or {})

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        atomic_torch_save(prefix_state_dict(model, state_dict), os.path.join(output_dir, WEIGHTS_NAME))
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, f"tmp-{name}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and \
                self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                cb_name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[cb_name], list):
                    self.state.stateful_callbacks[cb_name].append(cb.state())
                else:
                    self.state.stateful_callbacks[cb_name] = cb.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state (and shards) into staging
        if self.args.should_save:
            _fsync_tree(staging)
            publish_directory(staging, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loading

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_ptuning_checkpoint(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def _generation_batches(self):
        """Evaluation batches come from the generation collator while generating."""
        saved = self.data_collator
        if self.args.predict_with_generate and self.generation_collator is not None:
            self.data_collator = self.generation_collator
        try:
            yield
        finally:
            self.data_collator = saved

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        with self._generation_batches():
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                    **gen_kwargs)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        with self._generation_batches():
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                   **gen_kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """Generate for a left-padded batch: returns `(None, new tokens [b, n], reference labels)`.

        Without `--predict_with_generate` (or loss-only evaluation): the
        teacher-forced loss only, never the `[b, s, vocab]` logits.
        """
        inputs = self._prepare_inputs(inputs)
        if not self.args.predict_with_generate or prediction_loss_only:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = model(input_ids=inputs["input_ids"], labels=inputs["labels"], skip_logits=True).loss
            return loss.detach(), None, None
        kwargs = {**self.generation_kwargs, **{k: v for k, v in gen_kwargs.items() if v is not None}}
        if self.args.generation_num_beams is not None and "num_beams" not in kwargs:
            kwargs["num_beams"] = self.args.generation_num_beams
        generator = self.accelerator.unwrap_model(model)
        prompt = inputs["input_ids"]
        with torch.no_grad():
            out = generator.generate(input_ids=prompt, attention_mask=inputs["attention_mask"], **kwargs)
        return None, out[:, prompt.shape[1]:], inputs.get("labels")
