"""Continuous batching over one base model, each row with its own P-Tuning prefix.

`Engine` runs one loop (in its own thread, `start()`), one iteration per decoding step:

1. requests that were cancelled or ran out of time leave (their rows are freed);
2. waiting requests are admitted while the batch has room (`max_batch_size` rows) and the step's
   prompt budget lasts (`max_prefill_tokens`: the prompts run before this step's decode, so the
   budget bounds how long the running rows wait): each prompt runs alone, over its prefix, in a
   cache of its own, exactly as `generate()` runs it, and its keys and values (prefix included)
   are copied into a free row of the batch;
3. one forward decodes the next token of every running row; each row samples with its own
   settings and generator, stops on eos, a stop string or its token limit, and leaves.

The batch's KV cache is one pool per layer `[max_batch_size, heads, capacity, head_dim]`. Every row
writes its next token at the same column (`filled`), so rows are right-aligned: a row holds
`[prefix | prompt | answer]` in columns `[start, filled)` and the columns before `start` are masked
(a `GLMMask` with per-row `pad = start`). When a longer row joins, the running rows shift right;
when the pool's end is reached or the masked columns outgrow the used ones, rows shift left. Rows
are kept in `[0, running)` (a leaving row's place is taken by the last one), so the forward runs on
the running rows only (`GLMKVCache.from_buffers` over views of the pool).

Greedy output is the same as the request run alone with `generate()`: the prompt runs the same
way, and a decode row sees exactly its own keys in the same order (masked columns add nothing).
"""
from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import torch

from .. import inputs as glm_inputs
from ..cache import GLMKVCache
from ..ops.mask import GLMMask
from .prefixes import Prefix
from .sampling import sample_rows
from .text import BadRequest, TextStream

log = logging.getLogger("glm_kernels.serve")


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests (HTTP 429)."""


class UnknownModel(KeyError):
    """No base model or prefix of that name (HTTP 404)."""


@dataclass(frozen=True)
class SamplingParams:
    """A request's decoding settings. `temperature == 0` is greedy (as OpenAI's API reads it)."""

    max_new_tokens: int
    temperature: float = 0.95
    top_p: float = 0.7
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Event:
    """What a request's callback receives: new text, and at the end `finish_reason` and the counts.

    finish_reason: None while running; "stop" (eos or a stop string), "length" (token limit),
    "timeout", "cancelled", "error" (`error` says why).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A request in the engine; `cancel()` frees its row at the next step."""

    id: int
    prefix: Prefix
    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[Event], None]
    deadline: float
    stream: TextStream
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False
    generated: int = 0
    last_token: int = 0
    position: int = 0  # GLM position of every answer token (the [gMASK] position)
    block: int = 1  # block position of the last token fed
    start: int = 0  # first pool column of the row

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Batched generation over `model` (a `ChatGLMForConditionalGeneration`) and named prefixes.

    Args:
        model, tokenizer: the base model (any dtype, device, quantization) and its tokenizer.
        prefixes: name -> `Prefix` (the base model's own entry included, see `prefixes.base_prefix`).
        max_batch_size: rows decoded together.
        max_prefill_tokens: prompt tokens admitted per step (at least one prompt always is).
        max_queue: waiting requests; `submit` raises `QueueFull` beyond.
        max_context: prompt + answer tokens per request (default: the model's max_sequence_length).
    """

    def __init__(self, model, tokenizer, prefixes: dict[str, Prefix], max_batch_size: int = 8,
                 max_prefill_tokens: int = 4096, max_queue: int = 64, max_context: int | None = None):
        if not prefixes:
            raise ValueError("the engine needs at least one model entry (the base)")
        if max_batch_size < 1 or max_prefill_tokens < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size and max_prefill_tokens must be >= 1 and max_queue >= 0, got "
                             f"{max_batch_size}, {max_prefill_tokens}, {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.prefixes = dict(prefixes)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        limit = self.config.max_sequence_length
        self.max_context = limit if max_context is None else max_context
        if not 1 < self.max_context <= limit:
            raise ValueError(f"max_context={max_context} must be in [2, max_sequence_length={limit}]")
        self.devices = model.transformer.layer_devices()
        self.capacity = max(p.length for p in self.prefixes.values()) + self.max_context
        nh = self.config.num_attention_heads
        shape = (max_batch_size, nh, self.capacity, self.config.hidden_size // nh)
        self.keys = [torch.zeros(shape, dtype=model.dtype, device=d) for d in self.devices]
        self.values = [torch.zeros(shape, dtype=model.dtype, device=d) for d in self.devices]
        self.rows: list[Request] = []  # running, row i in pool row i
        self.filled = 0  # the column every running row writes next
        self._view: GLMKVCache | None = None
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run
        self.finished: Counter[str] = Counter()  # requests by finish reason
        self.moves: Counter[str] = Counter()  # pool rearrangements: "left", "right" shifts, "row" moves

    # ------------------------------------------------------------------ requests

    @property
    def model_names(self) -> list[str]:
        return list(self.prefixes)

    def check(self, model: str, prompt_tokens: int, max_new_tokens: int | None) -> int:
        """The request's token limit, or `UnknownModel` / `BadRequest` naming what is wrong."""
        if model not in self.prefixes:
            raise UnknownModel(model)
        room = self.max_context - prompt_tokens
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens; this server's context is {self.max_context} "
                             "tokens (prompt + answer)", "messages")
        if max_new_tokens is None:
            return room
        if max_new_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {max_new_tokens}", "max_tokens")
        if max_new_tokens > room:
            raise BadRequest(f"max_tokens={max_new_tokens} + the prompt's {prompt_tokens} tokens exceed this "
                             f"server's context of {self.max_context} tokens: at most {room}", "max_tokens")
        return max_new_tokens

    def submit(self, model: str, prompt_ids: list[int], params: SamplingParams,
               callback: Callable[[Event], None], timeout: float | None = None) -> Request:
        """Queue a request; `callback` gets its `Event`s from the engine's thread."""
        prefix = self.prefixes.get(model)
        if prefix is None:
            raise UnknownModel(model)
        self.check(model, len(prompt_ids), params.max_new_tokens)
        generator = None
        if not params.greedy:
            generator = torch.Generator()  # draws on the CPU: the same answer for a seed on any device
            generator.manual_seed(secrets.randbits(63) if params.seed is None else params.seed % 2**64)
        deadline = time.monotonic() + timeout if timeout else float("inf")
        request = Request(next(self._ids), prefix, list(prompt_ids), params, callback, deadline,
                          TextStream(self.tokenizer, params.stop), generator)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the server's max_queue); retry later")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self.rows), "waiting": len(self._waiting), "steps": self.steps,
                    "max_batch_size": self.max_batch_size, "finished": dict(self.finished)}

    # ------------------------------------------------------------------ the loop

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="glm-kernels-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self.rows:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # a bug in the loop itself: fail the rows, keep serving
                log.exception("engine step failed")
                self._fail_all("internal error in the batching loop")
        for request in list(self.rows) + list(self._waiting):
            self._finish(request, "cancelled", error="the server is shutting down")

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: drop, admit (prefill), decode one token for every running row."""
        self._drop_finished()
        self._admit()
        if self.rows:
            try:
                logits = self._decode()
            except Exception as err:  # the batch's forward failed: its rows fail, the server goes on
                log.exception("decode step failed")
                self._fail_all(f"decoding failed: {err}")
                return
            self._sample_and_emit(list(self.rows), logits)
            self._drop_finished()

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for request in list(self.rows):
            if not request.done:
                if request.cancelled:
                    self._finish(request, "cancelled")
                elif now > request.deadline:
                    self._finish(request, "timeout", error="the request ran past its time limit")
            if request.done:
                self._remove_row(request)
        with self._lock:
            waiting = list(self._waiting)
        for request in waiting:
            if request.cancelled:
                self._finish(request, "cancelled")
            elif now > request.deadline:
                self._finish(request, "timeout", error="the request waited past its time limit")
        if any(r.done for r in waiting):
            with self._lock:
                self._waiting = deque(r for r in self._waiting if not r.done)

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        first = True
        while len(self.rows) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting[0]
                if not first and len(request.prompt_ids) > budget:
                    return
                self._waiting.popleft()
            first = False
            budget -= len(request.prompt_ids)
            try:
                logits, cache = self._prefill(request)
            except Exception as err:  # this request fails alone
                log.exception("prefill of request %d failed", request.id)
                self._finish(request, "error", error=f"prefill failed: {err}")
                continue
            self._sample_and_emit([request], logits)
            if not request.done:
                self._join(request, cache)

    # ------------------------------------------------------------------ model calls

    def _prefill(self, request: Request):
        """The prompt alone over its prefix, as `generate()` runs it: `(last logits [1, vocab], cache)`."""
        prefix = request.prefix
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.model.device)
        positions = glm_inputs.get_position_ids(ids, self.config.bos_token_id, self.config.mask_token_id,
                                                self.config.gmask_token_id)
        request.position, request.block = int(positions[0, 0, -1]), int(positions[0, 1, -1])
        cache = GLMKVCache(self.config, 1, len(request.prompt_ids), dtype=self.model.dtype, device=self.devices,
                           prefix_len=prefix.length)
        if prefix.length:
            cache.write_prefix(prefix.key_values)
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float(), cache

    def _decode(self) -> torch.Tensor:
        rows = self.rows
        if self.filled >= self.capacity:
            self._shift_left(min(r.start for r in rows))
        if self._view is None:
            n = len(rows)
            starts = torch.tensor([r.start for r in rows], dtype=torch.int32)
            mask = GLMMask(0, starts, starts)
            tokens = max(self.filled - r.start - r.prefix.length for r in rows)
            self._view = GLMKVCache.from_buffers([k[:n] for k in self.keys], [v[:n] for v in self.values],
                                                 self.filled, mask, padded=any(r.start for r in rows),
                                                 seq_length=tokens)
        device = self.model.device
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[[r.position], [r.block + 1]] for r in rows], dtype=torch.long, device=device)
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=self._view, use_cache=True,
                         logits_to_keep=1, check_inputs=False)
        self.filled += 1
        self.steps += 1
        for r in rows:
            r.block += 1
        return out.logits[:, -1].float()

    # ------------------------------------------------------------------ rows in the pool

    def _join(self, request: Request, cache: GLMKVCache) -> None:
        """Put a prefilled request into pool row `len(rows)`, right-aligned at `filled`."""
        length = cache.filled
        if not self.rows:
            self.filled = length
        elif self.filled < length:  # room on the left for the longer row (the pool's end is handled in _decode)
            self._shift_right(length - self.filled)
        row = len(self.rows)
        request.start = self.filled - length
        for i in range(len(self.keys)):
            src_k, src_v = cache.layers[i].keys, cache.layers[i].values
            self.keys[i][row, :, request.start:self.filled].copy_(src_k[0, :, :length])
            self.values[i][row, :, request.start:self.filled].copy_(src_v[0, :, :length])
        self.rows.append(request)
        self._view = None

    def _remove_row(self, request: Request) -> None:
        row = self.rows.index(request)
        last = len(self.rows) - 1
        if row != last:  # the last row takes the freed place
            moved = self.rows[last]
            for buf in self.keys + self.values:
                buf[row, :, moved.start:self.filled].copy_(buf[last, :, moved.start:self.filled])
            self.rows[row] = moved
            self.moves["row"] += 1
        self.rows.pop()
        self._view = None
        if not self.rows:
            self.filled = 0
            return
        lo = min(r.start for r in self.rows)
        if lo > self.filled - lo:  # more masked columns than used ones: attention would read mostly padding
            self._shift_left(lo)

    def _shift_left(self, by: int) -> None:
        if by <= 0:
            return
        n = len(self.rows)
        for buf in self.keys + self.values:
            buf[:n, :, :self.filled - by] = buf[:n, :, by:self.filled].clone()
        self.filled -= by
        self.moves["left"] += 1
        for r in self.rows:
            r.start -= by
        self._view = None

    def _shift_right(self, by: int) -> None:
        n = len(self.rows)
        if self.filled + by > self.capacity:
            raise RuntimeError(f"pool overflow: {self.filled} + {by} > {self.capacity}")
        for buf in self.keys + self.values:
            buf[:n, :, by:self.filled + by] = buf[:n, :, :self.filled].clone()
        self.filled += by
        self.moves["right"] += 1
        for r in self.rows:
            r.start += by
        self._view = None

    # ------------------------------------------------------------------ tokens out

    def _sample_and_emit(self, requests: list[Request], logits: torch.Tensor) -> None:
        try:
            tokens = sample_rows(logits, [r.params for r in requests], [r.generator for r in requests])
        except Exception as err:
            log.exception("sampling failed")
            for r in requests:
                self._finish(r, "error", error=f"sampling failed: {err}")
            return
        eos = self.config.eos_token_id
        for request, token in zip(requests, tokens.tolist()):
            try:
                self._emit(request, token, eos)
            except Exception as err:  # one request's text handling fails alone
                log.exception("request %d failed", request.id)
                self._finish(request, "error", error=f"{type(err).__name__}: {err}")

    def _emit(self, request: Request, token: int, eos: int) -> None:
        if request.done:
            return
        request.generated += 1
        request.last_token = token
        if token == eos:
            self._finish(request, "stop")
            return
        piece, stopped = request.stream.push(token)
        if stopped:
            self._finish(request, "stop", piece)
        elif request.generated >= request.params.max_new_tokens:
            self._finish(request, "length", piece)
        elif piece:
            request.callback(Event(piece, prompt_tokens=len(request.prompt_ids),
                                   completion_tokens=request.generated))

    def _finish(self, request: Request, reason: str, piece: str = "", error: str | None = None) -> None:
        if request.done:
            return
        request.done = True
        self.finished[reason] += 1
        if error is None:
            piece += request.stream.finish()
        try:
            request.callback(Event(piece, reason, len(request.prompt_ids), request.generated, error))
        except Exception:
            log.exception("callback of request %d failed", request.id)

    def _fail_all(self, error: str) -> None:
        for request in list(self.rows):
            self._finish(request, "error", error=error)
        self.rows.clear()
        self.filled = 0
        self._view = None
