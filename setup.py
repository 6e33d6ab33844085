"""Build script kept for the optional C++ extension under csrc/.

Metadata lives in pyproject.toml. When csrc/ holds C++ sources, they are
built as `glm_kernels._C` with torch's cpp_extension (install with
`pip install --no-build-isolation` so the build sees the installed torch);
without sources this is a pure-Python package.

The extension is optional: without torch in the build environment (pip's
build isolation) or without a working C++ compiler, the package installs
without it (a warning says why) and runs on PyTorch's own kernels.
"""
import sys
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
# paths relative to setup.py: setuptools refuses absolute ones when it builds a wheel
sources = sorted(p.relative_to(here).as_posix() for p in here.joinpath("csrc").glob("*.cpp"))
kwargs = {}
if sources:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        print(f"glm_kernels: C++ extension skipped ({err}); install with `pip install --no-build-isolation .` "
              "after torch to build it", file=sys.stderr)
    else:
        class OptionalBuildExtension(BuildExtension):
            """torch's BuildExtension, where a failed compile skips the extension instead of the install."""

            def build_extensions(self):
                try:
                    super().build_extensions()
                except Exception as err:  # no compiler, or a failing one (torch's checks and ninja raise various)
                    print(f"glm_kernels: C++ extension not built ({type(err).__name__}: {err}); PyTorch's kernels "
                          "will run", file=sys.stderr)
                    self.extensions = []  # nothing to copy or install afterwards
                    self.distribution.ext_modules = []

        kwargs = {
            # -fopenmp: at::parallel_for splits work only when the extension itself is built with OpenMP (as
            # ATen is); without it the loops run on one thread. -ffp-contract=off: a product and a sum written as two
            # operations (the residual join x * alpha + r, rounded as PyTorch's two ops) stay two roundings.
            "ext_modules": [CppExtension("glm_kernels._C", sources, extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
                                         extra_link_args=["-fopenmp"])],
            "cmdclass": {"build_ext": OptionalBuildExtension},
        }
setup(**kwargs)
