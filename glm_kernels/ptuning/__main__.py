"""`python -m glm_kernels.ptuning ARGS` = `glm-kernels ptune ARGS` (handy for `torchrun -m glm_kernels.ptuning`)."""
import sys

from .main import main

sys.exit(main())
