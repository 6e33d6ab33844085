"""The batching engine without HTTP: batched greedy answers equal solo `generate()`, the pool's moves,
sampling rules, streamed text, prefix loading errors."""
import json
import random

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

import glm_kernels.ops as ops
from glm_kernels.serve import SamplingParams, load_prefix
from glm_kernels.serve.sampling import filtered_probs, sample_rows
from glm_kernels.serve.text import BadRequest, TextStream, messages_to_chat
from glm_kernels.generation import build_prompt
from serve_helpers import BASE_NAME, PREFIXES, load_base, make_engine, solo_answer

PROMPTS = ["你好", "类型#裙*颜色#红色*风格#复古", "类型#上衣*颜色#白色*图案#条纹",
           "白色条纹上衣清爽百搭。黑色简约裙子大方得体。休闲牛仔裤舒适耐穿。类型#裤*材质#牛仔布*风格#休闲", "裙"]


@pytest.fixture(scope="module")
def base():
    return load_base()


def run_all(engine, jobs, max_steps=2000):
    """Submit `(model, prompt, max_new_tokens)` jobs (greedy), step until all finish: {index: (text, event)}."""
    results, parts = {}, {}
    tok = engine.tokenizer

    def callback(i):
        def on_event(ev):
            parts.setdefault(i, []).append(ev.text)
            if ev.finish_reason:
                results[i] = ("".join(parts[i]), ev)
        return on_event

    for i, (model, prompt, n) in enumerate(jobs):
        engine.submit(model, tok(prompt)["input_ids"], SamplingParams(max_new_tokens=n, temperature=0), callback(i))
    for _ in range(max_steps):
        if len(results) == len(jobs):
            break
        engine.step()
    assert len(results) == len(jobs), f"{len(jobs) - len(results)} requests never finished"
    return results


def test_batched_greedy_equals_each_request_alone(base, serve_prefix_dirs, monkeypatch):
    """Mixed prefixes (none, 4, 9 columns), prompt lengths 2-40 and answer limits in one continuous batch,
    joining and leaving at different steps: every answer and token count equals generate() alone. Every
    batched decode step runs as one C++ call on the CPU (`ops.step_infer`, bitwise the model's forward)."""
    model, tok = base
    engine = make_engine(model, tok, serve_prefix_dirs, max_batch_size=4)
    names = [BASE_NAME, *PREFIXES]
    jobs = [(names[i % 3], PROMPTS[(i * 2) % 5], 3 + 7 * (i % 4)) for i in range(12)]
    taken, one_call = [], ops.step_infer

    def counting(*args, **kwargs):
        out = one_call(*args, **kwargs)
        taken.append(out is not None)
        return out
    monkeypatch.setattr(ops, "step_infer", counting)
    results = run_all(engine, jobs)
    assert taken == [True] * engine.steps and engine.steps > 0
    for i, (model_name, prompt, n) in enumerate(jobs):
        text, ev = results[i]
        expected = solo_answer(serve_prefix_dirs, model_name, prompt, n)
        assert (text, ev.completion_tokens, ev.finish_reason) == expected, f"job {i} {model_name} {prompt!r}"
    # the prefixes matter (otherwise this test could not tell rows apart)
    answers = {m: solo_answer(serve_prefix_dirs, m, PROMPTS[1], 24)[0] for m in names}
    assert len(set(answers.values())) == 3, answers
    # the batch really was shared: fewer decode steps than tokens, and rows moved in the pool
    assert engine.steps < sum(ev.completion_tokens for _, ev in results.values())
    assert engine.moves["row"] > 0 and engine.moves["right"] > 0
    assert engine.stats()["running"] == 0 and engine.filled == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_batches_like_solo(serve_prefix_dirs, bits):
    """`glm-kernels serve --quantization-bit N`: an INT8/INT4 base, prefixes in fp32 over it, batched answers
    equal generate() alone on the same quantized model with the prefix loaded the usual way."""
    from glm_kernels import ChatGLMForConditionalGeneration, ChatGLMTokenizer
    from serve_helpers import BASE

    model = ChatGLMForConditionalGeneration.from_pretrained(str(BASE), quantization_bit=bits).eval()
    tok = ChatGLMTokenizer.from_pretrained(str(BASE))
    engine = make_engine(model, tok, serve_prefix_dirs, max_batch_size=3)
    jobs = [([BASE_NAME, "short", "long"][i % 3], PROMPTS[i % 4], 6 + 4 * (i % 3)) for i in range(6)]
    results = run_all(engine, jobs)
    for i, (name, prompt, n) in enumerate(jobs):
        text, tokens, _ = solo_answer(serve_prefix_dirs, name, prompt, n, quantization_bit=bits)
        assert results[i][1].completion_tokens == tokens, f"job {i}"
        assert results[i][0] == text, f"job {i} {name}"


def test_pool_wraps_around_its_end(base, serve_prefix_dirs):
    """A small context: rows reach the pool's last column many times and shift left; answers unchanged."""
    model, tok = base
    engine = make_engine(model, tok, serve_prefix_dirs, max_batch_size=3, max_context=48)
    jobs = [([BASE_NAME, *PREFIXES][i % 3], PROMPTS[i % 3], 20 + 4 * (i % 3)) for i in range(9)]
    results = run_all(engine, jobs)
    assert engine.moves["left"] > 0
    for i, (model_name, prompt, n) in enumerate(jobs):
        assert results[i][0] == solo_answer(serve_prefix_dirs, model_name, prompt, n)[0], f"job {i}"


def test_admission_respects_batch_size_and_prefill_budget(base, serve_prefix_dirs):
    model, tok = base
    engine = make_engine(model, tok, serve_prefix_dirs, max_batch_size=2, max_prefill_tokens=1)
    for prompt in PROMPTS[:4]:
        engine.submit(BASE_NAME, tok(prompt)["input_ids"], SamplingParams(max_new_tokens=30, temperature=0),
                      lambda ev: None)
    engine.step()  # budget of 1 token: only the first prompt is admitted (one always is)
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 3
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 2  # batch full
    engine.step()
    assert engine.stats()["running"] == 2


def test_queue_bound_cancel_and_timeout(base, serve_prefix_dirs):
    from glm_kernels.serve import QueueFull

    model, tok = base
    engine = make_engine(model, tok, serve_prefix_dirs, max_batch_size=1, max_queue=2)
    ids = tok(PROMPTS[0])["input_ids"]
    events = {}

    def record(name):
        return lambda ev: events.setdefault(name, []).append(ev)

    a = engine.submit(BASE_NAME, ids, SamplingParams(max_new_tokens=500, temperature=0), record("a"))
    engine.submit(BASE_NAME, ids, SamplingParams(max_new_tokens=500, temperature=0), record("b"), timeout=1e-6)
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        engine.submit(BASE_NAME, ids, SamplingParams(max_new_tokens=5, temperature=0), record("c"))
    engine.step()  # b timed out in the queue; a runs
    assert events["b"][-1].finish_reason == "timeout"
    assert engine.stats()["running"] == 1
    a.cancel()
    engine.step()
    assert events["a"][-1].finish_reason == "cancelled" and engine.stats()["running"] == 0
    assert engine.finished == {"timeout": 1, "cancelled": 1}


def test_a_failing_request_fails_alone(base, serve_prefix_dirs, monkeypatch):
    model, tok = base
    engine = make_engine(model, tok, serve_prefix_dirs, max_batch_size=4)
    jobs = [(BASE_NAME, PROMPTS[0], 8), ("short", PROMPTS[1], 8), ("long", PROMPTS[2], 8)]
    push = TextStream.push

    def fragile(self, token_id):  # the second request's text handling breaks
        if self.stop == ("@@",):
            raise RuntimeError("broken detokenizer")
        return push(self, token_id)

    monkeypatch.setattr(TextStream, "push", fragile)
    results, errors = {}, {}
    for i, (m, p, n) in enumerate(jobs):
        def cb(ev, i=i):
            if ev.finish_reason:
                results[i] = ev
        engine.submit(m, tok(p)["input_ids"], SamplingParams(max_new_tokens=n, temperature=0,
                                                             stop=("@@",) if i == 1 else ()), cb)
    while len(results) < 3:
        engine.step()
    assert results[1].finish_reason == "error" and "broken detokenizer" in results[1].error
    assert results[0].finish_reason in ("stop", "length") and results[2].finish_reason in ("stop", "length")
    # a failing batched forward fails its rows, and the engine goes on
    forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if kwargs["input_ids"].shape[1] == 1 and calls["n"] == 3:
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", flaky)
    monkeypatch.setattr(TextStream, "push", push)
    failed = {}
    engine.submit(BASE_NAME, tok(PROMPTS[0])["input_ids"], SamplingParams(max_new_tokens=8, temperature=0),
                  lambda ev: failed.setdefault("ev", ev) if ev.finish_reason else None)
    while "ev" not in failed:
        engine.step()
    assert failed["ev"].finish_reason == "error" and "device lost" in failed["ev"].error
    assert engine.stats()["running"] == 0
    again = run_all(engine, [(BASE_NAME, PROMPTS[0], 8)])
    assert again[0][0] == solo_answer(serve_prefix_dirs, BASE_NAME, PROMPTS[0], 8)[0]


def test_sampling_rules_match_transformers():
    """Per-row temperature and top-p give transformers' warpers' distribution; greedy rows take the argmax."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    settings = ((0.95, 0.7), (0.5, 0.9), (1.3, 0.2), (1.0, 1.0))
    params = [SamplingParams(1, temperature=t, top_p=p) for t, p in settings]
    probs = filtered_probs(logits, torch.tensor([p.temperature for p in params]),
                           torch.tensor([p.top_p for p in params]))
    for row, p in enumerate(params):
        scores = TopPLogitsWarper(p.top_p)(None, TemperatureLogitsWarper(p.temperature)(None, logits[row:row + 1]))
        assert torch.allclose(probs[row], scores.softmax(-1)[0], atol=1e-6, rtol=1e-5)  # fp32 softmax rounding
        assert torch.equal(probs[row] > 0, torch.isfinite(scores[0]))
    # rows whose nucleus is wider than the TOP_K candidates sorted first (a flat distribution) take the full sort
    flat = torch.randn(3, 2000) * 0.05
    wide = filtered_probs(flat, torch.tensor([1.0, 0.9, 1.0]), torch.tensor([0.9, 0.5, 0.01]))
    for row, (t, p) in enumerate(((1.0, 0.9), (0.9, 0.5), (1.0, 0.01))):
        scores = TopPLogitsWarper(p)(None, TemperatureLogitsWarper(t)(None, flat[row:row + 1]))
        assert torch.allclose(wide[row], scores.softmax(-1)[0], atol=1e-6, rtol=1e-5)
        assert torch.equal(wide[row] > 0, torch.isfinite(scores[0]))
    assert (wide[0] > 0).sum() > 256 and (wide[2] > 0).sum() < 256
    greedy = SamplingParams(1, temperature=0)
    mixed = [greedy, params[0], greedy]
    gens = [None, torch.Generator().manual_seed(3), None]
    tokens = sample_rows(logits[:3], mixed, gens)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert filtered_probs(logits[1:2], torch.tensor([0.95]), torch.tensor([0.7]))[0, tokens[1]] > 0
    # a row's draw depends only on its own generator (same seed, other rows around it: same token)
    again = sample_rows(logits[1:2], [params[0]], [torch.Generator().manual_seed(3)])
    assert tokens[1] == again[0]
    # the original's guard: a row with NaN scores puts everything on token 5
    bad = logits[:2].clone()
    bad[1, 7] = float("nan")
    assert sample_rows(bad, [greedy, greedy], [None, None]).tolist() == [int(logits[0].argmax()), 5]


def test_streamed_pieces_add_up_to_the_answer(base):
    """Random token sequences: the pieces sent are never taken back and join to the final text; stop strings
    cut the answer and are never sent, even split over tokens."""
    _, tok = base
    rng = random.Random(0)
    vocab = [i for i in range(20, len(tok)) if i not in (tok.eos_token_id,)]
    marks = [tok.convert_tokens_to_ids(t) for t in (",", "!", "?", ":", "▁,") if tok.convert_tokens_to_ids(t)]
    for trial in range(40):
        ids = [rng.choice(vocab + marks * 20) for _ in range(rng.randint(1, 25))]
        stream = TextStream(tok)
        sent = "".join(stream.push(i)[0] for i in ids) + stream.finish()
        assert sent == stream.text, (trial, ids)
    ids = tok("这款红色裙子复古优雅。白色条纹上衣", add_special_tokens=False)["input_ids"]
    for stop in ("优雅", "裙子复古", "。白"):
        stream = TextStream(tok, stop=(stop,))
        pieces, stopped = [], False
        for i in ids:
            piece, stopped = stream.push(i)
            pieces.append(piece)
            if stopped:
                break
        assert stopped and stop not in "".join(pieces)
        assert "".join(pieces) == stream.text == "这款红色裙子复古优雅。白色条纹上衣".split(stop)[0]


def test_messages_become_the_original_prompt():
    q, h = messages_to_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": [{"type": "text", "text": "c"}]}])
    assert build_prompt(q, h) == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答："
    q, h = messages_to_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert (q, h) == ("be brief\nhi", [])
    for bad, what in (([], "non-empty"), ([{"role": "assistant", "content": "x"}], "expected 'user'"),
                      ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], "role 'tool'"),
                      ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
                      ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts")):
        with pytest.raises(BadRequest, match=what):
            messages_to_chat(bad)


def test_prefix_with_the_wrong_length_is_refused(base, serve_prefix_dirs, tmp_path):
    model, _ = base
    with pytest.raises(ValueError, match=r"pre_seq_len=4.*pre_seq_len=5"):
        load_prefix("short", serve_prefix_dirs["short"], model, pre_seq_len=5)
    # a config.json that lies about the length: the weights' shape decides, with the reason
    lying = tmp_path / "lying"
    lying.mkdir()
    for f in serve_prefix_dirs["short"].iterdir():
        (lying / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((lying / "config.json").read_text())
    cfg["pre_seq_len"] = 16
    (lying / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"--ptuning x=.*trained with pre_seq_len=4, model has pre_seq_len=16"):
        load_prefix("x", lying, model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prefix("x", tmp_path / "missing", model)
