"""Build the assets of the P-Tuning v2 demo: an ADGEN-style dataset and a tiny pre-trained ChatGLM base.

    python -m glm_kernels.tools.build_demo_assets [--out DIR] [--steps N]

writes into `glm_kernels/ptuning/assets/` (or DIR):

    data/train.json, data/dev.json   JSON lines {"content", "summary"} (AdvertiseGen's columns), 320 / 80 rows
    base/config.json                 ChatGLMConfig: hidden 128, 4 layers, 4 heads of 32, MLP 512, vocab 641,
                                     max_sequence_length 2048, pre_seq_len None, tied head
    base/model.safetensors           fp32 weights (875k parameters, 3.5 MB; the tied lm_head is not stored)
    base/ice_text.model              SentencePiece model in ChatGLM's layout (num_image_tokens=0)
    base/tokenizer_config.json

VERIFIED P-TUNING RECIPE (the defaults for `make demo`; prefix encoder only, everything else frozen)
    pre_seq_len 32, prefix_projection False, prefix dropout 0.1 (the model's, in train mode)
    AdamW lr 2e-2, weight_decay 0, linear decay to 0, no warmup; batch 16; 400 steps (20 epochs of 320 rows)
    max_source_length 32, max_target_length 40 (nothing is truncated; rows padded to 72 as THUDM's main.py)
    evaluation: greedy `generate(max_new_tokens=40, do_sample=False)`, left-padded batches
    results (4 seeds): exact-match train 0% -> 100%, dev 0% -> 98.8% (79/80; the miss repeats a clause);
    dev ROUGE-L 27.6 -> 99.9, BLEU-4 8.4 -> 99.8 (one seed; jieba words / characters as THUDM's main.py);
    `chat(tokenizer, train_or_dev_prompt, history=[], do_sample=False)` returns the summary.
    Training time on the 2-core CPU (torch 2.13, plain loop): 37-42 s when the machine is idle, 145 s when
    other jobs took a core; 300 steps: 26-30 s idle, train 99.4-100%, dev 98.8%; 200 steps: train 98%, dev 96%.
    P=16 needs lr 3e-2 and 400 steps for 100% train (dev 97.5%); lr 2e-2 / 300 steps: train 97%, dev 95%.

DESIGN
    The task is attribute -> ad copy in three styles, each a deterministic function of the attributes:
    描述 (plain description, the DEFAULT), 种草 (influencer tone: every value through its own phrase) and
    简洁 (keywords). A prompt may start with a style tag, `【种草】类型#连衣裙*颜色#红色*风格#复古`.
    The base is pre-trained (full parameters, 1500 steps of 32 freshly sampled examples, AdamW 2e-3 with
    warmup and cosine decay) on tagged prompts of every style and on untagged prompts, which get the default
    style; it never sees a train.json or dev.json prompt. train.json / dev.json pair UNTAGGED prompts with 种草
    summaries, so before tuning the base answers in the 描述 style (exact-match 0%), and the soft prefix learns
    to play the role of the 【种草】 tag. Since the style is a function of the attributes, the trained prefix
    also answers most unseen dev prompts exactly. The builder checks the base before writing it: greedy
    exact-match >= 97% for every tagged style and for untagged -> 描述 on 200 held-out prompts (it got 100%
    on each), and the untagged train.json prompts must not already give their summaries (0%).

    Summaries are at most 36 tokens (mean 26), prompts at most 29 (tagged ones 32). The data files depend
    only on this module (`build_data()`, seeded `random.Random`); the tokenizer is trained single-threaded
    on a seeded corpus; the weights come from seeded CPU training. A second run of the builder reproduced
    every file byte for byte (same machine, torch 2.13 CPU, sentencepiece 0.2.3; another torch or
    sentencepiece build may give other bytes). Pre-training takes 283 s on an idle 2-core CPU (856 s while
    other jobs shared it).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------- the task
# Attribute keys in ADGEN's order, the values each takes, and which keys every prompt has.
KEYS = ("类型", "版型", "材质", "颜色", "风格", "图案")
VALUES = {
    "类型": ("连衣裙", "半身裙", "阔腿裤", "牛仔裤", "衬衫", "T恤", "卫衣", "毛衣", "外套", "风衣"),
    "版型": ("宽松", "修身", "直筒", "收腰"),
    "材质": ("纯棉", "雪纺", "针织", "牛仔", "真丝", "羊毛"),
    "颜色": ("红色", "白色", "黑色", "蓝色", "粉色", "绿色", "黄色", "灰色", "紫色", "卡其色"),
    "风格": ("复古", "简约", "休闲", "甜美", "通勤", "文艺", "街头", "优雅"),
    "图案": ("格子", "条纹", "印花", "碎花", "刺绣", "波点", "字母"),
}
REQUIRED = ("类型", "颜色", "风格")
OPTIONAL = ("版型", "材质", "图案")

# 种草 (the style of the demo's train.json): every attribute value has its own phrase.
SEED_COLOR = {"红色": "显白红", "白色": "奶油白", "黑色": "高级黑", "蓝色": "清爽蓝", "粉色": "少女粉",
              "绿色": "森系绿", "黄色": "活力黄", "灰色": "雾霾灰", "紫色": "香芋紫", "卡其色": "温柔卡其"}
SEED_FIT = {"宽松": "藏肉不挑身材", "修身": "勾勒好身材", "直筒": "线条利落", "收腰": "显瘦又显高"}
SEED_MATERIAL = {"纯棉": "纯棉亲肤", "雪纺": "雪纺飘逸", "针织": "针织软糯", "牛仔": "牛仔耐穿",
                 "真丝": "真丝顺滑", "羊毛": "羊毛保暖"}
SEED_PATTERN = {"格子": "格子超减龄", "条纹": "条纹很经典", "印花": "印花好吸睛", "碎花": "碎花很温柔",
                "刺绣": "刺绣显精致", "波点": "波点俏皮", "字母": "字母够潮"}
SEED_STYLE = {"复古": "复古范儿", "简约": "简约大方", "休闲": "慵懒休闲", "甜美": "甜到心里", "通勤": "通勤百搭",
              "文艺": "文艺满分", "街头": "酷飒街头", "优雅": "优雅迷人"}


def render_plain(a: dict) -> str:
    """描述 (the default style): a plain product description."""
    parts = [f"这款{a['颜色']}{a['类型']}"]
    if "版型" in a:
        parts.append(f"{a['版型']}版型")
    if "材质" in a:
        parts.append(f"选用{a['材质']}面料")
    if "图案" in a:
        parts.append(f"饰以{a['图案']}图案")
    parts.append(f"尽显{a['风格']}气质")
    return "，".join(parts) + "。"


def render_seed(a: dict) -> str:
    """种草 (an influencer's recommendation): every value through its own phrase."""
    parts = [f"姐妹们冲！{SEED_COLOR[a['颜色']]}{a['类型']}"]
    if "版型" in a:
        parts.append(SEED_FIT[a["版型"]])
    if "材质" in a:
        parts.append(SEED_MATERIAL[a["材质"]])
    if "图案" in a:
        parts.append(SEED_PATTERN[a["图案"]])
    parts.append(SEED_STYLE[a["风格"]])
    return "，".join(parts) + "，谁穿谁好看！"


def render_brief(a: dict) -> str:
    """简洁 (keywords): the values as a list, the garment last."""
    words = [a["风格"], a["颜色"]] + [a[k] for k in OPTIONAL if k in a]
    return f"关键词：{'、'.join(words)}的{a['类型']}，一键收藏。"


STYLES = {"描述": render_plain, "种草": render_seed, "简洁": render_brief}
DEFAULT_STYLE = "描述"  # what an untagged prompt gets from the base model
DEMO_STYLE = "种草"  # what train.json / dev.json answer untagged prompts with


def tag(style: str) -> str:
    """The prompt prefix that selects `style` in the base model: `【种草】`."""
    return f"【{style}】"


def content(a: dict, style: str | None = None) -> str:
    """The ADGEN `content` of attributes `a`, optionally led by a style tag: `【种草】类型#裙*颜色#红色*...`."""
    text = "*".join(f"{k}#{a[k]}" for k in KEYS if k in a)
    return text if style is None else tag(style) + text


def sample_attributes(rng: random.Random) -> dict:
    """Random attributes in `KEYS` order: the required keys, each optional key with probability 1/2."""
    a = {k: rng.choice(VALUES[k]) for k in REQUIRED}
    for k in OPTIONAL:
        if rng.random() < 0.5:
            a[k] = rng.choice(VALUES[k])
    return {k: a[k] for k in KEYS if k in a}


DATA_SEED = 20230401
NUM_TRAIN = 320
NUM_DEV = 80


def build_data(seed: int = DATA_SEED, num_train: int = NUM_TRAIN, num_dev: int = NUM_DEV):
    """`(train_rows, dev_rows)`: `{"content", "summary"}` dicts, untagged prompts, 种草 summaries, disjoint prompts."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < num_train + num_dev:
        a = sample_attributes(rng)
        prompt = content(a)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"content": prompt, "summary": STYLES[DEMO_STYLE](a)})
    return rows[:num_train], rows[num_train:]


# ---------------------------------------------------------------------------------------------- tokenizer
TOKENIZER_SEED = 7
SP_VOCAB_SIZE = 1000


def tokenizer_corpus(seed: int = TOKENIZER_SEED, n: int = 4000) -> list[str]:
    """Sentences SentencePiece is trained on: prompts (tagged and not) and answers in every style."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a = sample_attributes(rng)
        lines.append(content(a))
        for style, render in STYLES.items():
            lines.append(content(a, style))
            lines.append(render(a))
    return lines


def train_sentencepiece(lines: list[str], vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A SentencePiece model laid out as ChatGLM's ice_text.model (`<pad>` = 3, `<n>`, `<|tab|>`,
    `<|blank_N|>`, byte fallback) with the 8 special pieces as CONTROL pieces (they decode to nothing)."""
    import sentencepiece as spm

    from ..tokenization import MAX_BLANK_LENGTH, SPECIAL_PIECES, TAB_TOKEN, LINEBREAK_TOKEN, blank_token

    whitespace = [LINEBREAK_TOKEN, TAB_TOKEN] + [blank_token(n) for n in range(2, MAX_BLANK_LENGTH + 1)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=whitespace, control_symbols=list(SPECIAL_PIECES), num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- base model
# The demo's --max_source_length / --max_target_length: every row of train.json and dev.json fits untruncated
# (prompts <= 29 tokens, summaries <= 36); THUDM's main.py pads training rows to their sum, 72.
MAX_SOURCE_LENGTH = 32
MAX_TARGET_LENGTH = 40
# Pre-training also sees tagged prompts (up to 32 tokens, i.e. longer than MAX_SOURCE_LENGTH - 1).
PRETRAIN_SOURCE_LENGTH = 40
PRETRAIN_TARGET_LENGTH = 48
MODEL_SHAPE = dict(hidden_size=128, num_layers=4, num_attention_heads=4, inner_hidden_size=512)
MAX_SEQUENCE_LENGTH = 2048  # rotary positions have no weights; 2048 lets chat()'s default max_length run
PRETRAIN = dict(steps=1500, batch_size=32, lr=2e-3, warmup=100, weight_decay=0.01, seed=0,
                untagged=0.4)


def training_features(tokenizer, prompt: str, answer: str, max_source_length: int = MAX_SOURCE_LENGTH,
                      max_target_length: int = MAX_TARGET_LENGTH) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` exactly as THUDM's ptuning/main.py builds a training row (before padding)."""
    a_ids = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
    b_ids = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(a_ids, b_ids)
    start = input_ids.index(tokenizer.bos_token_id)
    return input_ids, [-100] * start + input_ids[start:]


def collate(rows, pad_id: int):
    """Right-pad `(input_ids, labels)` rows into two LongTensors (pad id / -100)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def pretraining_example(rng: random.Random, excluded: set[str], untagged: float) -> tuple[str, str]:
    """One `(prompt, answer)` of the base model's task, never one of the demo's prompts.

    With probability `untagged` the prompt has no tag and the answer is in the
    default style; otherwise a style is drawn uniformly and named by the tag."""
    while True:
        a = sample_attributes(rng)
        if content(a) not in excluded:
            break
    if rng.random() < untagged:
        return content(a), STYLES[DEFAULT_STYLE](a)
    style = rng.choice(sorted(STYLES))
    return content(a, style), STYLES[style](a)


def tiny_config(tokenizer, **overrides):
    """The base's `ChatGLMConfig`: `MODEL_SHAPE`, the tokenizer's vocabulary size and special ids."""
    from ..configuration import ChatGLMConfig

    fields = dict(vocab_size=len(tokenizer), max_sequence_length=MAX_SEQUENCE_LENGTH,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                  pad_token_id=tokenizer.pad_token_id, pre_seq_len=None, prefix_projection=False,
                  tie_word_embeddings=True, **MODEL_SHAPE)
    fields.update(overrides)
    return ChatGLMConfig(**fields)


def init_weights(model, seed: int, std: float = 0.02) -> None:
    """GPT-style init: N(0, std) weights and embeddings, zero biases, unit LayerNorms."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def pretrain(model, tokenizer, excluded: set[str], steps: int, batch_size: int, lr: float, warmup: int,
             weight_decay: float, seed: int, untagged: float, progress: bool = True) -> list[float]:
    """Full-parameter training of the base on freshly sampled examples; returns the loss of every step."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pre-training the base", disable=not progress)
    for _ in bar:
        rows = [training_features(tokenizer, *pretraining_example(rng, excluded, untagged), PRETRAIN_SOURCE_LENGTH,
                                  PRETRAIN_TARGET_LENGTH) for _ in range(batch_size)]
        ids, labels = collate(rows, tokenizer.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_TARGET_LENGTH,
           batch_size: int = 64) -> list[str]:
    """Greedy answers to `prompts` (batched, left-padded), new tokens decoded with `skip_special_tokens`, stripped."""
    import torch

    answers = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            inputs = tokenizer(prompts[i: i + batch_size], padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]
    return answers


def exact_match(answers: list[str], references: list[str]) -> float:
    """Fraction of answers equal to their reference, both stripped."""
    return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / max(1, len(references))


# ---------------------------------------------------------------------------------------------- writing
ASSETS = Path(__file__).resolve().parent.parent / "ptuning" / "assets"
TOKENIZER_CONFIG = {
    "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
    "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "remove_space": False,
    "do_lower_case": False, "num_image_tokens": 0, "padding_side": "left", "tokenizer_class": "ChatGLMTokenizer",
}
EVAL_SEED = 99
EVAL_PROMPTS = 200
MIN_BASE_EXACT_MATCH = 0.97  # the builder refuses to write a base below this on any style


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data(out: Path) -> tuple[list[dict], list[dict]]:
    """Write `data/train.json` and `data/dev.json` (JSON lines) under `out`; return the rows."""
    train, dev = build_data()
    write_jsonl(out / "data" / "train.json", train)
    write_jsonl(out / "data" / "dev.json", dev)
    return train, dev


def write_tokenizer(base: Path):
    """Write `ice_text.model` and `tokenizer_config.json` into `base`; return the loaded `ChatGLMTokenizer`."""
    from ..tokenization import ChatGLMTokenizer

    base.mkdir(parents=True, exist_ok=True)
    (base / "ice_text.model").write_bytes(train_sentencepiece(tokenizer_corpus()))
    (base / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    return ChatGLMTokenizer.from_pretrained(str(base))


def base_report(model, tokenizer, train: list[dict]) -> dict:
    """Greedy exact-match of the base: each style on held-out tagged prompts, untagged -> default style,
    and the untagged train.json prompts against their (种草) summaries, which must stay low."""
    rng = random.Random(EVAL_SEED)
    excluded = {r["content"] for r in train}
    attrs = []
    while len(attrs) < EVAL_PROMPTS:
        a = sample_attributes(rng)
        if content(a) not in excluded:
            attrs.append(a)
    report = {}
    for style in sorted(STYLES):
        report[f"tagged {style}"] = exact_match(greedy(model, tokenizer, [content(a, style) for a in attrs]),
                                                [STYLES[style](a) for a in attrs])
    report[f"untagged -> {DEFAULT_STYLE}"] = exact_match(greedy(model, tokenizer, [content(a) for a in attrs]),
                                                         [STYLES[DEFAULT_STYLE](a) for a in attrs])
    answers = greedy(model, tokenizer, [r["content"] for r in train])
    report["train.json untagged -> its summary"] = exact_match(answers, [r["summary"] for r in train])
    return report


def build(out: Path = ASSETS, progress: bool = True, **pretrain_overrides) -> dict:
    """Write every asset under `out`; return the base model's report (see `base_report`)."""
    import torch
    from safetensors.torch import save_file

    from ..modeling import ChatGLMForConditionalGeneration
    from ..tokenization import ChatGLMTokenizer, check_tokenizer_matches

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(out)
    train, dev = write_data(out)
    base = out / "base"
    for stale in ("model.safetensors", "config.json"):
        (base / stale).unlink(missing_ok=True)
    tokenizer = write_tokenizer(base)
    config = tiny_config(tokenizer)
    check_tokenizer_matches(tokenizer, config)
    settings = {**PRETRAIN, **pretrain_overrides}
    torch.manual_seed(settings["seed"])
    model = ChatGLMForConditionalGeneration(config)
    init_weights(model, settings["seed"])
    excluded = {r["content"] for r in train + dev}
    start = time.time()
    losses = pretrain(model, tokenizer, excluded, progress=progress, **settings)
    report = {"pretrain_seconds": round(time.time() - start, 1), "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5)}
    report.update(base_report(model, tokenizer, train))
    weak = {k: v for k, v in report.items() if k.startswith(("tagged", "untagged")) and v < MIN_BASE_EXACT_MATCH}
    if weak or report["train.json untagged -> its summary"] > 0.05:
        raise RuntimeError(f"the pre-trained base does not behave as designed, nothing written to {base}: {report}")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq")}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(base / "model.safetensors", 0o644)
    config.save_pretrained(str(base))
    reloaded = ChatGLMForConditionalGeneration.from_pretrained(str(base))
    check_tokenizer_matches(ChatGLMTokenizer.from_pretrained(str(base)), reloaded.config)
    for key, value in reloaded.state_dict().items():
        if not torch.equal(value, model.state_dict()[key]):
            raise RuntimeError(f"{base}: {key} does not load back identically")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_kernels.tools.build_demo_assets",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help=f"output directory (default {ASSETS})")
    parser.add_argument("--steps", type=int, default=PRETRAIN["steps"], help="pre-training steps of the base")
    args = parser.parse_args(argv)
    report = build(args.out, steps=args.steps)
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
