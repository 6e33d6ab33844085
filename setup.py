"""Build script kept for the optional C++ extension under csrc/.

Metadata lives in pyproject.toml. When csrc/ holds C++ sources, they are
built as `glm_kernels._C` with torch's cpp_extension (install with
`pip install --no-build-isolation` so the build sees the installed torch);
without sources this is a pure-Python package.
"""
from pathlib import Path

from setuptools import setup

sources = sorted(str(p) for p in Path(__file__).parent.joinpath("csrc").glob("*.cpp"))
kwargs = {}
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    kwargs = {
        "ext_modules": [CppExtension("glm_kernels._C", sources, extra_compile_args=["-O3"])],
        "cmdclass": {"build_ext": BuildExtension},
    }
setup(**kwargs)
