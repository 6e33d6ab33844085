"""Shared pieces of the P-Tuning tests: a tiny base checkpoint directory, data files, the THUDM argument lists."""
import json

import torch

from conftest import randomize
from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from test_tokenizer import CORPUS, train_model

# THUDM's ptuning/train.sh and evaluate.sh, argument for argument; {placeholders} are the test's paths.
TRAIN_SH = """--do_train --train_file {train} --validation_file {dev} --prompt_column content --response_column summary
 --overwrite_cache --model_name_or_path {model} --output_dir {out} --overwrite_output_dir --max_source_length 64
 --max_target_length 64 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
 --gradient_accumulation_steps 16 --predict_with_generate --max_steps 3000 --logging_steps 10 --save_steps 1000
 --learning_rate 2e-2 --pre_seq_len 128 --quantization_bit 4"""
EVALUATE_SH = """--do_predict --validation_file {dev} --test_file {dev} --overwrite_cache --prompt_column content
 --response_column summary --model_name_or_path {model} --ptuning_checkpoint {checkpoint} --output_dir {out}
 --overwrite_output_dir --max_source_length 64 --max_target_length 64 --per_device_eval_batch_size 1
 --predict_with_generate --pre_seq_len 128 --quantization_bit 4"""

ADGEN_ROWS = [
    {"content": "类型#裙*颜色#红色*风格#复古", "summary": "这款红色裙子复古优雅。"},
    {"content": "类型#上衣*颜色#白色*图案#条纹", "summary": "白色条纹上衣清爽百搭。"},
    {"content": "类型#裤*材质#牛仔布*风格#休闲", "summary": "休闲牛仔裤舒适耐穿。"},
    {"content": "类型#裙*颜色#黑色*风格#简约", "summary": "黑色简约裙子大方得体。"},
]


def args_of(template: str, **paths) -> list[str]:
    return template.format(**{k: str(v) for k, v in paths.items()}).split()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_base_dir(directory, hidden=64, layers=2, heads=2, max_sequence_length=256, seed=0):
    """A checkpoint directory like the release's: config.json, model.safetensors, ice_text.model (no image ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = CORPUS + [r["content"] + r["summary"] for r in ADGEN_ROWS] * 20
    (directory / "ice_text.model").write_bytes(train_model(corpus=corpus))
    tok = ChatGLMTokenizer(vocab_file=str(directory / "ice_text.model"), num_image_tokens=0)
    tok.save_pretrained(str(directory))
    cfg = ChatGLMConfig(vocab_size=len(tok), hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                        inner_hidden_size=2 * hidden, max_sequence_length=max_sequence_length,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = randomize(ChatGLMForConditionalGeneration(cfg)).eval()
    model.save_pretrained(str(directory))
    return directory
