"""`make demo`'s job (`glm-kernels demo`): a real P-Tuning run on the shipped assets that visibly learns."""
import json
import os
import re
import subprocess
import sys

from glm_kernels.cli import build_parser
from glm_kernels.serve import SamplingParams
from glm_kernels.serve.cli import build_engine


def test_demo_learns_the_style_and_chat_uses_the_prefix(tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "glm_kernels.cli", "demo", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = {m.group(1): [float(x) for x in m.group(2).split(" | ")]
             for m in re.finditer(r"^\| (\w[^|]*?) \| \d+ \| (.*) \|$", out.stdout, re.M)}
    # columns: exact match, BLEU-4, ROUGE-1, ROUGE-2, ROUGE-L (percent)
    assert table["training, before"][0] <= 5 and table["training, after"][0] >= 90
    assert table["dev (unseen), after"][0] >= 80 and table["dev (unseen), after"][4] > table["dev (unseen), before"][4]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ptune" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < 0.1 * losses[0]
    chat = re.search(r"答：(.*)\n\s+\(reference: (.*)\)", out.stdout)
    first = json.loads((tmp_path / "after-dev" / "generated_predictions.txt").read_text().splitlines()[0])
    assert chat and chat.group(2) == first["labels"]
    assert chat.group(1) == first["predict"]  # chat() with the prefix answers as the batched prediction did
    assert chat.group(1).startswith("姐妹们冲！")  # in the style the prefix was trained on
    assert (tmp_path / "ptune" / "loss_curve.png").is_file()
    # the command the demo prints serves the trained prefix: the same answer from the batching engine
    served = re.search(r"^  glm-kernels (serve --model \S+ --ptuning demo=\S+)$", out.stdout, re.M)
    query = re.search(r"问：(.*)\n", out.stdout).group(1)
    assert served, out.stdout[-1000:]
    engine = build_engine(build_parser().parse_args(served.group(1).split()))
    events = []
    engine.submit("demo", engine.tokenizer(query)["input_ids"], SamplingParams(max_new_tokens=64, temperature=0),
                  events.append)
    while not events or not events[-1].finish_reason:
        engine.step()
    assert "".join(e.text for e in events) == chat.group(1) and events[-1].finish_reason == "stop"
