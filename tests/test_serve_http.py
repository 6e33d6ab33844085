"""The server over real HTTP on 127.0.0.1, called with the `openai` client (and httpx for raw checks):
answers equal `generate()` alone, streaming, concurrency over mixed prefixes, disconnects, queue limits,
timeouts, bad input, the original api.py route and the command line."""
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import BASE, BASE_NAME, free_port, load_base, make_engine, served, solo_answer

QUESTIONS = ["你好", "类型#裙*颜色#红色*风格#复古", "类型#上衣*颜色#白色*图案#条纹", "类型#裤*材质#牛仔布*风格#休闲"]


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kwargs)


def user(text):
    return [{"role": "user", "content": text}]


def wait_until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def slow_engine(serve_prefix_dirs, monkeypatch):
    """An engine whose decode steps take >= 50 ms and never pick eos (answers run to max_tokens), so that
    requests are still running when the test acts."""
    def make(**kwargs):
        model, tokenizer = load_base()
        engine = make_engine(model, tokenizer, serve_prefix_dirs, **kwargs)
        decode = engine._decode

        def slow():
            time.sleep(0.05)
            logits = decode()
            logits[:, tokenizer.eos_token_id] = float("-inf")
            return logits

        monkeypatch.setattr(engine, "_decode", slow)
        return engine
    return make


def test_models_health_and_a_greedy_answer(served_tiny):
    c = client(served_tiny)
    assert [m.id for m in c.models.list().data] == [BASE_NAME, "short", "long"]
    health = httpx.get(served_tiny.url + "/health").json()
    assert health["status"] == "ok" and health["models"] == [BASE_NAME, "short", "long"]
    for model in (BASE_NAME, "short", "long"):
        r = c.chat.completions.create(model=model, messages=user(QUESTIONS[1]), max_tokens=10, temperature=0)
        text, tokens, reason = solo_answer(served_tiny.prefix_dirs, model, QUESTIONS[1], 10)
        assert r.choices[0].message.content == text
        assert r.choices[0].finish_reason == reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(served_tiny.engine.tokenizer(
            QUESTIONS[1])["input_ids"]), tokens)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_history_follows_the_original_prompt(served_tiny):
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": QUESTIONS[2]}]
    r = client(served_tiny).chat.completions.create(model="long", messages=messages, max_tokens=12, temperature=0)
    prompt = f"[Round 0]\n问：{QUESTIONS[0]}\n答：你好！\n[Round 1]\n问：{QUESTIONS[2]}\n答："
    assert r.choices[0].message.content == solo_answer(served_tiny.prefix_dirs, "long", prompt, 12)[0]


def test_streaming_adds_up_to_the_answer(served_tiny):
    c = client(served_tiny)
    for model in ("short", "long"):
        chunks = list(c.chat.completions.create(model=model, messages=user(QUESTIONS[3]), max_tokens=16,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        text, tokens, reason = solo_answer(served_tiny.prefix_dirs, model, QUESTIONS[3], 16)
        assert "".join(pieces) == text and len(pieces) > 3  # streamed in pieces, not at the end
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens


def test_parallel_clients_with_mixed_prefixes_get_their_solo_answers(served_tiny):
    """12 concurrent clients over three models (streamed and not): each answer equals that request alone,
    and the engine decoded them together (fewer steps than tokens)."""
    jobs = [([BASE_NAME, "short", "long"][i % 3], QUESTIONS[i % 4], 6 + 3 * (i % 5), i % 2 == 0) for i in range(12)]
    c = client(served_tiny)
    steps_before = served_tiny.engine.steps
    start = threading.Barrier(len(jobs))

    def run(job):
        model, question, n, stream = job
        start.wait()
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=model, messages=user(question), max_tokens=n, temperature=0, stream=True) if ch.choices)
        return c.chat.completions.create(model=model, messages=user(question), max_tokens=n,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))
    for (model, question, n, _), answer in zip(jobs, answers):
        assert answer == solo_answer(served_tiny.prefix_dirs, model, question, n)[0], (model, question, n)
    steps = served_tiny.engine.steps - steps_before
    assert steps < sum(n for _, _, n, _ in jobs) - len(jobs)


def test_sampling_with_a_seed_is_reproducible(served_tiny):
    c = client(served_tiny)
    answers = {c.chat.completions.create(model="short", messages=user(QUESTIONS[0]), max_tokens=12, temperature=0.9,
                                         top_p=0.9, seed=7).choices[0].message.content for _ in range(2)}
    assert len(answers) == 1
    for seed in (-1, 2**70):  # OpenAI takes any integer
        r = c.chat.completions.create(model="short", messages=user(QUESTIONS[0]), max_tokens=4, seed=seed)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_end_the_answer(served_tiny):
    c = client(served_tiny)
    full = c.chat.completions.create(model="long", messages=user(QUESTIONS[1]), max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text[3:5]
    r = c.chat.completions.create(model="long", messages=user(QUESTIONS[1]), max_tokens=24, temperature=0,
                                  stop=[stop])
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="long", messages=user(QUESTIONS[1]), max_tokens=24, temperature=0, stop=stop, stream=True)
        if ch.choices)
    assert streamed == text[:text.index(stop)]


def test_bad_requests_get_400_or_404_with_the_reason(served_tiny):
    c = client(served_tiny)
    cases = [
        (dict(max_tokens=100000), "max_tokens=100000"),
        (dict(messages=user("裙" * 3000)), "context"),
        (dict(temperature=3), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=2), "n must be 1"),
        (dict(messages=[{"role": "assistant", "content": "x"}]), "expected 'user'"),
        (dict(messages=[]), "non-empty"),
        (dict(stop=["a", "b", "c", "d", "e"]), "at most 4"),
        (dict(presence_penalty=1), "not supported"),
    ]
    for change, reason in cases:
        args = {**dict(model="short", messages=user("你好"), max_tokens=4), **change}
        with pytest.raises(openai.BadRequestError, match=reason):
            c.chat.completions.create(**args)
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        c.chat.completions.create(model="nope", messages=user("你好"), max_tokens=4)
    raw = httpx.post(served_tiny.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(served_tiny.url + "/health").json()["status"] == "ok"  # still serving


def test_original_api_route(served_tiny):
    history = [[QUESTIONS[0], "你好！"]]
    r = httpx.post(served_tiny.url + "/", timeout=60, json={
        "prompt": QUESTIONS[2], "history": history, "max_length": 160, "temperature": 0, "top_p": 0.7})
    body = r.json()
    prompt = f"[Round 0]\n问：{QUESTIONS[0]}\n答：你好！\n[Round 1]\n问：{QUESTIONS[2]}\n答："
    n_prompt = len(served_tiny.engine.tokenizer(prompt)["input_ids"])
    expected = solo_answer(served_tiny.prefix_dirs, BASE_NAME, prompt, 160 - n_prompt)[0]
    assert r.status_code == 200 and body["status"] == 200 and body["response"] == expected
    assert body["history"] == history + [[QUESTIONS[2], expected]]
    time.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    r = httpx.post(served_tiny.url + "/", json={"prompt": "你好", "model": "long", "max_length": 3}, timeout=10)
    assert r.status_code == 400 and "max_length=3" in r.json()["error"]["message"]


def test_client_disconnect_frees_the_row(slow_engine):
    engine = slow_engine(max_batch_size=2)
    with served(engine) as server:
        stream = client(server).chat.completions.create(model="short", messages=user("你好"), max_tokens=1000,
                                                        temperature=0, stream=True)
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        wait_until(lambda: engine.stats()["running"] == 1)
        stream.close()  # the client goes away mid-answer
        wait_until(lambda: engine.stats()["running"] == 0)  # cancelled at the next step
        assert engine.finished["cancelled"] == 1
        # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.5, json={
                "model": "long", "messages": user("你好"), "max_tokens": 1000, "temperature": 0})
        wait_until(lambda: engine.finished["cancelled"] == 2 and engine.stats()["running"] == 0)


def test_full_queue_gets_429_and_timeouts_504(slow_engine):
    engine = slow_engine(max_batch_size=1, max_queue=1)
    with served(engine, timeout=2.0) as server:
        c = client(server)
        body = dict(model="short", messages=user("你好"), max_tokens=1000, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(lambda: c.chat.completions.create(**body))
            wait_until(lambda: engine.stats()["running"] == 1)
            queued = pool.submit(lambda: c.chat.completions.create(**body))
            wait_until(lambda: engine.stats()["waiting"] == 1)
            with pytest.raises(openai.RateLimitError, match="waiting"):
                c.chat.completions.create(**body)
            for future in (running, queued):  # both run past the server's 2 s limit
                with pytest.raises(openai.APIStatusError) as err:
                    future.result(timeout=30)
                assert err.value.status_code == 504 and "within 2 s" in str(err.value)
        with pytest.raises(openai.APIError, match="within 2 s"):  # a stream reports it in an error event
            for _ in c.chat.completions.create(**body, stream=True):
                pass
        wait_until(lambda: engine.stats()["running"] == 0)
        r = c.chat.completions.create(model="short", messages=user("你好"), max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason == "length"  # the server serves on


def test_a_failing_request_gets_500_and_the_others_finish(serve_prefix_dirs, monkeypatch):
    from glm_kernels.serve.text import TextStream

    push = TextStream.push

    def fragile(self, token_id):  # requests with this stop string break in the engine's text handling
        if "@@boom" in self.stop:
            raise RuntimeError("boom")
        return push(self, token_id)

    monkeypatch.setattr(TextStream, "push", fragile)
    model, tokenizer = load_base()
    with served(make_engine(model, tokenizer, serve_prefix_dirs), serve_prefix_dirs) as server:
        c = client(server)
        jobs = [("short", QUESTIONS[0], None), ("long", QUESTIONS[1], "@@boom"), (BASE_NAME, QUESTIONS[2], None),
                ("long", QUESTIONS[3], None)]

        def run(job):
            model_name, question, stop = job
            try:
                return c.chat.completions.create(model=model_name, messages=user(question), max_tokens=10,
                                                 temperature=0, stop=stop).choices[0].message.content
            except openai.APIStatusError as err:
                return err

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        failed = results[1]
        assert isinstance(failed, openai.InternalServerError) and "boom" in str(failed)
        for (model_name, question, _), answer in zip(jobs, results):
            if answer is not failed:
                assert answer == solo_answer(serve_prefix_dirs, model_name, question, 10)[0]
        assert httpx.get(server.url + "/health").json()["finished"]["error"] == 1


def test_command_line_server(serve_prefix_dirs, tmp_path):
    """`glm-kernels serve` in its own process: a wrong pre_seq_len is refused before listening; a good
    start answers curl-style requests on 127.0.0.1."""
    exe = os.path.join(os.path.dirname(sys.executable), "glm-kernels")
    bad = subprocess.run([exe, "serve", "--model", str(BASE), "--ptuning", f"p={serve_prefix_dirs['long']}",
                          "--pre-seq-len", "5", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "--ptuning p=" in bad.stderr and "pre_seq_len=9" in bad.stderr and "pre_seq_len=5" in bad.stderr
    port = free_port()
    proc = subprocess.Popen([exe, "serve", "--model", str(BASE), "--model-name", "demo", "--ptuning",
                             f"adgen={serve_prefix_dirs['short']}", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "adgen", "messages": user(QUESTIONS[1]), "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == solo_answer(serve_prefix_dirs, "short",
                                                                           QUESTIONS[1], 8)[0]
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["demo", "adgen"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
