"""Generation for ChatGLM on current transformers: `generate()`, `chat()`, `stream_chat()`.

`generate()` is transformers' own (greedy, sampling, beam search, streamers ...), fed the way the
original feeds ChatGLM:
- the cache is a preallocated `GLMKVCache` (prefix written once, tokens written in place);
- position ids are GLM's 2D ids: after the prompt the position stays at the mask position and the
  block position grows by one per token;
- masks: the original tokenizer's boolean `[b, 1, s, s]` mask (converted to the left-padding mask
  it encodes, since transformers only passes 2D masks through `generate`), a standard 2D padding
  mask, or none (left padding is then read from leading pad tokens).

The prompt is checked once per `generate()` call (ids in the vocabulary, positions in range, the
mask GLM's); the steps after it are built here from checked values, so they are run with
`check_inputs=False` and the mask the cache keeps: no host sync in the model's decode steps
(docs/gpu.md).
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from . import inputs as glm_inputs
from .cache import GLMKVCache
from .ops.mask import GLMMask


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The original's guard: if any score is NaN or inf, put all the probability on token 5.

    Decided on the device (no host sync): the scores are rewritten under a 0-d condition.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        invalid = (~torch.isfinite(scores)).any()
        scores.masked_fill_(invalid, 0.0)
        scores[..., 5].masked_fill_(invalid, 5e4)
        return scores


def build_prompt(query: str, history=None) -> str:
    """The original chat prompt: the query alone, or `[Round i]\\n问：{q}\\n答：{a}\\n` rounds then the query."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(response: str) -> str:
    """The original's post-processing: strip, fill the training-date placeholder, CJK punctuation."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, cjk_mark in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
        response = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % cjk_mark, response)
        response = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % cjk_mark, response)
    return response


def _sampling(do_sample, top_p, temperature) -> dict:
    """Sampling arguments; greedy decoding takes none (transformers warns about unused ones)."""
    return dict(do_sample=True, top_p=top_p, temperature=temperature) if do_sample else dict(do_sample=False)


class ChatGLMGenerationMixin(GenerationMixin):
    """What `ChatGLMForConditionalGeneration` adds to transformers' `GenerationMixin`."""

    # ------------------------------------------------------------------ inputs

    def _padding_mask(self, input_ids, attention_mask):
        """The 2D left-padding mask `generate` works with, from what the caller passed."""
        if attention_mask is None:
            # Left padding = the leading pad tokens of each row (a pad id inside the text is a token).
            return (torch.cumsum(input_ids != self.config.pad_token_id, dim=1) > 0).long()
        if attention_mask.dim() == 4:
            glm = GLMMask.from_bool(attention_mask, 0, input_ids.shape[0])
            if glm is None:
                raise ValueError("generate() takes the original tokenizer's GLM mask [b, 1, s, s] or a padding mask "
                                 "[b, s]; this boolean mask is neither (use the model's forward for arbitrary masks)")
            context = glm_inputs.context_lengths(input_ids, self.config.bos_token_id)
            if not torch.equal(glm.context.to(context.device), context):
                raise ValueError("the attention mask's context does not end at each row's <sop> token")
            return (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >=
                    glm.pad.to(input_ids.device)[:, None]).long()
        return attention_mask

    def _glm_position_ids(self, input_ids, attention_mask):
        cfg = self.config
        pad = None if attention_mask is None else glm_inputs.left_padding(attention_mask, *input_ids.shape)
        return glm_inputs.get_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id, cfg.gmask_token_id,
                                           pad=pad)

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' `generate`, taking what the original tokenizer returns.

        `input_ids` with a boolean GLM mask `[b, 1, s, s]` and `position_ids [b, 2, s]`
        (the original tokenizer's output), with a 2D padding mask, or alone
        (left padding is read from leading pad tokens). Everything else is
        transformers': `max_new_tokens`, `do_sample`, `top_p`, `temperature`,
        `num_beams`, `streamer`, `return_dict_in_generate`, `past_key_values` (a
        `GLMKVCache` from an earlier call continues it) ...
        """
        input_ids = kwargs.pop("input_ids", inputs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("ChatGLM generation needs input_ids (the GLM mask and positions come from them)")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"generate() needs input_ids [batch, seq], got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        for name in ("attention_mask", "position_ids"):
            t = kwargs.get(name)
            if t is not None and t.device != input_ids.device:
                raise ValueError(f"{name} is on {t.device} but input_ids are on {input_ids.device}: pass it on "
                                 f"{input_ids.device}")
        kwargs["attention_mask"] = self._padding_mask(input_ids, kwargs.get("attention_mask"))
        return super().generate(input_ids, generation_config=generation_config, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return self._glm_position_ids(inputs_tensor, model_kwargs.get("attention_mask"))

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        # GLM position ids are [b, 2, s]: batch first (transformers takes 3D ids as [3, b, s] m-rope ids)
        position_ids = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        if position_ids is not None:
            model_kwargs["position_ids"] = position_ids.repeat_interleave(expand_size, dim=0)
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        position_ids = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if position_ids is not None:
            # the original's rule: the position stays at the mask position, the block position grows
            new = position_ids[..., -1:].repeat(1, 1, num_new_tokens)
            new[:, 1, :] += torch.arange(1, num_new_tokens + 1, device=position_ids.device)
            if isinstance(model_kwargs.get("past_key_values"), GLMKVCache):
                model_kwargs["position_ids"] = new  # the next step feeds only the new tokens
            else:
                model_kwargs["position_ids"] = torch.cat((position_ids, new), dim=-1)
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache=True, logits_to_keep=None, is_first_iteration=False,
                                      check_inputs=None, **kwargs):
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        new_ids = input_ids[:, past:]
        if position_ids is None:
            position_ids = self._glm_position_ids(input_ids, attention_mask)
        if is_first_iteration:  # the caller's prompt (and mask, positions): checked
            position_ids = position_ids[..., past:]
        else:  # a step built here from checked values: only the new tokens' positions are kept
            position_ids = position_ids[..., -new_ids.shape[1]:]
            if isinstance(past_key_values, GLMKVCache) and past_key_values.mask is not None:
                attention_mask = None  # the cache keeps the rows' padding and context
        return {
            "input_ids": new_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
            "logits_to_keep": logits_to_keep,
            "check_inputs": bool(is_first_iteration) if check_inputs is None else check_inputs,
        }

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if generation_config.max_length > self.config.max_sequence_length:
            raise ValueError(f"max_length={generation_config.max_length} exceeds the model's max_sequence_length="
                             f"{self.config.max_sequence_length}")
        cache = model_kwargs.get("past_key_values")
        if cache is not None:
            if not isinstance(cache, GLMKVCache):
                raise TypeError(f"past_key_values for ChatGLM generation must be a GLMKVCache, got "
                                f"{type(cache).__name__}")
            if cache.get_max_length() < max_cache_length:
                raise ValueError(f"the GLMKVCache holds {cache.get_max_length()} tokens, generation needs "
                                 f"{max_cache_length}")
            cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        rows = batch_size * max(generation_config.num_beams, generation_config.num_return_sequences or 1)
        model_kwargs["past_key_values"] = GLMKVCache(self.config, rows, max_cache_length, dtype=self.dtype,
                                                     device=self.transformer.layer_devices())

    # ------------------------------------------------------------------ chat

    def _chat_inputs(self, tokenizer, query, history):
        from .tokenization import check_tokenizer_matches

        check_tokenizer_matches(tokenizer, self.config)
        return tokenizer([build_prompt(query, history)], return_tensors="pt").to(self.device)

    @torch.no_grad()
    def chat(self, tokenizer, query: str, history=None, max_length: int = 2048, num_beams: int = 1,
             do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, logits_processor=None,
             **kwargs):
        """One chat turn, as the original: returns `(response, history + [(query, response)])`."""
        history = list(history or [])
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        inputs = self._chat_inputs(tokenizer, query, history)
        outputs = self.generate(**inputs, max_length=max_length, num_beams=num_beams, logits_processor=processors,
                                **_sampling(do_sample, top_p, temperature), **kwargs)
        response = process_response(tokenizer.decode(outputs[0, inputs["input_ids"].shape[1]:].tolist()))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, query: str, history=None, max_length: int = 2048, do_sample: bool = True,
                    top_p: float = 0.7, temperature: float = 0.95, logits_processor=None, **kwargs):
        """Yield `(response so far, history + [(query, response so far)])` after every new token."""
        history = list(history or [])
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        inputs = self._chat_inputs(tokenizer, query, history)
        start = inputs["input_ids"].shape[1]
        for ids in self.stream_generate(**inputs, max_length=max_length, logits_processor=processors,
                                        **_sampling(do_sample, top_p, temperature), **kwargs):
            response = process_response(tokenizer.decode(ids[0, start:].tolist()))
            yield response, history + [(query, response)]

    @torch.no_grad()
    def stream_generate(self, input_ids, attention_mask=None, position_ids=None, max_length: int = 2048,
                        max_new_tokens: int | None = None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield `input_ids` with one more token each step until every row emits eos or `max_length` is reached.

        Each step is one `generate(max_new_tokens=1)` call continuing the same
        `GLMKVCache`, so sampling settings, logits processors and the cache
        behave exactly as in `generate`. Rows that finished are padded.
        """
        if max_new_tokens is not None:
            max_length = input_ids.shape[1] + max_new_tokens
        mask = self._padding_mask(input_ids, attention_mask)
        if position_ids is None:
            position_ids = self._glm_position_ids(input_ids, mask)
        cache = GLMKVCache(self.config, input_ids.shape[0], max_length, dtype=self.dtype,
                           device=self.transformer.layer_devices())
        eos = self.generation_config.eos_token_id if self.generation_config.eos_token_id is not None else \
            self.config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        while input_ids.shape[1] < max_length:
            out = self.generate(input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                                max_new_tokens=1, return_dict_in_generate=True, **kwargs)
            kwargs.setdefault("check_inputs", False)  # the next prompts are built here from checked values
            new = out.sequences[:, -1]
            new = torch.where(done, torch.full_like(new, self.config.pad_token_id), new)
            done |= torch.isin(new, eos)
            input_ids = torch.cat((input_ids, new[:, None]), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            nxt = position_ids[..., -1:].clone()
            nxt[:, 1] += 1
            position_ids = torch.cat((position_ids, nxt), dim=-1)
            if bool(done.all()):
                break
            yield input_ids
