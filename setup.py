"""Build the one compiled module, llmdist._core, from Cython and the host runtime in C."""
from Cython.Build import cythonize
from setuptools import Extension, setup

ext = Extension(
    "llmdist._core",
    sources=["llmdist/_core.pyx", "src/host_runtime.c"],
    include_dirs=["include"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wno-unused-function"],
    libraries=["pthread", "dl"],
)

setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
