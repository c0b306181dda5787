"""Build the one compiled module, llmdist._core, from Cython and the host runtime in C."""

import glob
import os
import shutil

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Also leave a copy of the built module in the source tree, so that `python -m llmdist`
    and the tests run from a checkout import the same build as the installed wheel."""

    def run(self):
        super().run()
        if self.inplace:
            return
        here = os.path.dirname(os.path.abspath(__file__))
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            target = os.path.join(here, self.get_ext_filename(ext.name))
            if os.path.exists(built) and os.path.isdir(os.path.dirname(target)):
                shutil.copyfile(built, target)


DEBUG_BUILD = os.environ.get("LLMDIST_DEBUG_BUILD") == "1"

ext = Extension(
    "llmdist._core",
    sources=[
        "llmdist/_core.pyx",
        "src/runtime_common.c",
        "src/host_runtime.c",
        "src/acl_runtime.c",
        "src/cuda_runtime.c",
        "src/cuda_copy.c",
        "src/layer_gate.c",
        "src/buffer_pool.c",
        "src/process_vm_baseline.c",
        "src/host_trace.c",
    ],
    include_dirs=["include"],
    depends=sorted(
        glob.glob("include/llmdist/*.h")
        + glob.glob("src/*.h")
        + glob.glob("llmdist/*.pxi")
        + glob.glob("llmdist/*.pxd")
    ),
    # -g0 after Python's own -g, and a stripped link: the wheel carries no debug info
    # (LLMDIST_DEBUG_BUILD=1 keeps it, for the sanitizer build's reports)
    extra_compile_args=[
        "-O3",
        *([] if DEBUG_BUILD else ["-g0"]),
        "-std=gnu11",
        "-Wno-unused-function",
    ],
    extra_link_args=[] if DEBUG_BUILD else ["-Wl,--strip-debug"],
    libraries=["pthread", "dl", "rt"],
)

setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=cythonize(
        [ext],
        language_level=3,
        # embedsignature: inspect.signature() and help() see each function's parameters
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
            "embedsignature.format": "python",
        },
    ),
)
