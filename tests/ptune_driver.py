"""Runs `glm-kernels ptune ARGS` in a fresh process, optionally dying abruptly (SIGKILL) in the middle of a save.

    python ptune_driver.py none ARGS...            # a plain run
    python ptune_driver.py kill-saving:N ARGS...   # SIGKILL while checkpoint-N is half written
"""
import os
import signal
import sys

from glm_kernels.ptuning.main import main
from glm_kernels.ptuning.trainer import PTuningTrainer

mode, argv = sys.argv[1], sys.argv[2:]
if mode.startswith("kill-saving:"):
    step = int(mode.split(":")[1])
    save_rng = PTuningTrainer._save_rng_state

    def dying_save_rng_state(self, output_dir):
        if self.state.global_step == step:  # the prefix weights and optimizer are written, the rest is not
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng(self, output_dir)

    PTuningTrainer._save_rng_state = dying_save_rng_state
sys.exit(main(argv))
