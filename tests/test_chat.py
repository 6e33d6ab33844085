"""chat(), stream_chat() and the terminal chat, with a tokenizer trained in the test and a tiny model."""
import io
import os
import subprocess
import sys

import pytest
import torch

from conftest import randomize
from glm_kernels import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from glm_kernels.generation import build_prompt, process_response
from test_tokenizer import train_model


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A checkpoint directory: tiny random model + ice_text.model, ids without the image offset (as released)."""
    d = tmp_path_factory.mktemp("chatglm-tiny")
    (d / "ice_text.model").write_bytes(train_model())
    tok = ChatGLMTokenizer(vocab_file=str(d / "ice_text.model"), num_image_tokens=0)
    tok.save_pretrained(str(d))
    cfg = ChatGLMConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_attention_heads=2,
                        inner_hidden_size=128, max_sequence_length=256, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id,
                        gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = randomize(ChatGLMForConditionalGeneration(cfg)).eval()
    model.save_pretrained(str(d))
    return d


def load(chat_dir, **overrides):
    model = ChatGLMForConditionalGeneration.from_pretrained(str(chat_dir), torch_dtype=torch.float32, **overrides)
    return model, ChatGLMTokenizer.from_pretrained(str(chat_dir))


def test_chat_is_generate_on_the_prompt_then_decode(chat_dir):
    model, tok = load(chat_dir)
    response, history = model.chat(tok, "你好", do_sample=False, max_length=30)
    ids = tok(["你好"], return_tensors="pt")["input_ids"]
    expected = model.generate(ids, do_sample=False, max_length=30)[0, ids.shape[1]:]
    assert response == process_response(tok.decode(expected.tolist()))
    assert history == [("你好", response)] and len(response) > 0
    # the second round sends the original's [Round i] prompt
    response2, history2 = model.chat(tok, "再见", history, do_sample=False, max_length=250)
    ids2 = tok([build_prompt("再见", history)], return_tensors="pt")["input_ids"]
    expected2 = model.generate(ids2, do_sample=False, max_length=250)[0, ids2.shape[1]:]
    assert response2 == process_response(tok.decode(expected2.tolist()))
    assert history2 == history + [("再见", response2)]


def test_stream_chat_grows_to_the_chat_response(chat_dir):
    model, tok = load(chat_dir)
    expected, _ = model.chat(tok, "hello world", do_sample=False, max_length=40)
    steps = list(model.stream_chat(tok, "hello world", do_sample=False, max_length=40))
    assert len(steps) > 1
    assert steps[-1][0] == expected and steps[-1][1] == [("hello world", expected)]
    texts = [text for text, _ in steps]
    assert all(len(a) <= len(b) for a, b in zip(texts, texts[1:]))


def test_chat_rejects_a_tokenizer_of_another_model(chat_dir, tmp_path):
    model, _ = load(chat_dir)
    other = ChatGLMTokenizer(vocab_file=str(chat_dir / "ice_text.model"))  # ids offset by 20000
    with pytest.raises(ValueError, match="vocab"):
        model.chat(other, "你好", do_sample=False, max_length=20)


def run_chat(*args, stdin_text):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "glm_kernels.cli", "chat", *args], input=stdin_text,
                          capture_output=True, text=True, env=env, timeout=300)


def test_terminal_chat_streams_the_response(chat_dir):
    out = run_chat("--model", str(chat_dir), "--greedy", "--max-length", "40", stdin_text="你好\nclear\nstop\n")
    assert out.returncode == 0, out.stderr
    model, tok = load(chat_dir)
    expected, _ = model.chat(tok, "你好", do_sample=False, max_length=40)
    assert f"ChatGLM：{expected}\n" in out.stdout
    assert out.stdout.count("用户：") == 3  # the question, clear, stop


def test_terminal_chat_with_a_ptuning_checkpoint(chat_dir, tmp_path):
    tuned, tok = load(chat_dir, pre_seq_len=4)
    with torch.no_grad():
        tuned.transformer.prefix_encoder.embedding.weight.normal_()
    tuned.save_ptuning_checkpoint(tmp_path / "pt")
    expected, _ = tuned.chat(tok, "hello", do_sample=False, max_length=40)
    plain, _ = load(chat_dir)[0].chat(tok, "hello", do_sample=False, max_length=40)
    out = run_chat("--model", str(chat_dir), "--ptuning-checkpoint", str(tmp_path / "pt"), "--greedy",
                   "--max-length", "40", stdin_text="hello\n")
    assert out.returncode == 0, out.stderr
    assert f"ChatGLM：{expected}\n" in out.stdout
    assert expected != plain  # the prefix changes the answer


def test_terminal_chat_errors(tmp_path, chat_dir):
    model_only = tmp_path / "no-tokenizer"
    model_only.mkdir()
    for name in os.listdir(chat_dir):
        if name != "ice_text.model":
            (model_only / name).write_bytes((chat_dir / name).read_bytes())
    out = run_chat("--model", str(model_only), stdin_text="stop\n")
    assert out.returncode == 2 and "ice_text.model" in out.stderr


def test_chat_loop_in_process(chat_dir):
    from glm_kernels.tools.chat import main

    class Args:
        model, ptuning_checkpoint, pre_seq_len, dtype, device, backend = str(chat_dir), None, None, None, "cpu", None
        max_length, greedy, top_p, temperature = 30, True, 0.7, 0.95

    out = io.StringIO()
    assert main(Args, stdin=io.StringIO("hi\n"), stdout=out) == 0  # end of input quits
    assert "ChatGLM：" in out.getvalue()
