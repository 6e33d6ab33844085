"""The `glm-kernels` entry point."""
import os
import re
import subprocess
import sys

import pytest


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "glm_kernels.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_selfcheck_reports_backend_and_matches_reference():
    out = run_cli("selfcheck", "--new-tokens", "6", env={"GLM_KERNELS_BACKEND": "torch"})
    assert out.returncode == 0, out.stderr
    assert "backend: torch  dtype: float32" in out.stdout
    diff, scale = map(float, re.search(r"reference\|: (\S+) \(scale max\|ref\| = (\S+)\)", out.stdout).groups())
    assert diff <= 1e-4 * scale  # GLM_SPEC fp32 model rule
    assert "greedy tokens identical to the reference: True" in out.stdout
    tokens = re.search(r"greedy tokens: \[(.*)\]", out.stdout).group(1).split(",")
    assert len(tokens) == 6


def test_selfcheck_rejects_unknown_backend_in_environment():
    out = run_cli("selfcheck", env={"GLM_KERNELS_BACKEND": "cuda"})
    assert out.returncode != 0
    assert "GLM_KERNELS_BACKEND is 'cuda'" in out.stderr


def test_quant_report_is_a_glm_kernels_command(capsys):
    from glm_kernels.cli import main

    # handed to the report's own parser, unchanged: its --help names the command and its options
    with pytest.raises(SystemExit) as exc:
        main(["quant-report", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: glm-kernels quant-report") and "--bits" in text and "--model" in text
    with pytest.raises(SystemExit) as exc:  # and its errors
        main(["quant-report", "--dtype", "int3"])
    assert exc.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
