"""Builds the Cython hot path in csrc/ into minivllm._cext.* extension modules."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["block_allocator", "scheduler", "cpu_kernels", "ring", "records", "text_sink"]

extensions = [
    Extension(
        f"minivllm._cext.{name}",
        [f"csrc/{name}.pyx"],
        include_dirs=["csrc", "ipc", np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ),
)
