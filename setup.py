"""Build of the native extension fastpunch._engine (csrc/*.c + _engine.pyx).

Environment switches (msgspec style):
  FASTPUNCH_DEBUG=1     -O0 -g, asserts on, Cython line tracing off
  FASTPUNCH_SANITIZE=1  AddressSanitizer + UBSan (use with LD_PRELOAD of libasan)
  FASTPUNCH_NATIVE=1    -march=native (local benchmarking only; never for wheels)
"""
import os
import sys
from glob import glob

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("fastpunch needs Linux: raw sockets, netfilter and TCP_REPAIR are Linux interfaces")

from Cython.Build import cythonize  # noqa: E402  (after the platform check on purpose)

debug = os.environ.get("FASTPUNCH_DEBUG") == "1"
sanitize = os.environ.get("FASTPUNCH_SANITIZE") == "1"

cflags = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-D_GNU_SOURCE"]
ldflags = []
if debug or sanitize:
    cflags += ["-O0", "-g", "-UNDEBUG"]
else:
    # Small footprint for embedded gateways: no debug info, stripped.
    cflags += ["-O3", "-g0"]
    ldflags += ["-s"]
if sanitize:
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]
if os.environ.get("FASTPUNCH_NATIVE") == "1":
    cflags += ["-march=native"]

engine = Extension(
    "fastpunch._engine",
    sources=["src/fastpunch/_engine.pyx"] + sorted(glob("csrc/*.c")),
    include_dirs=["csrc/include", "csrc"],
    depends=sorted(glob("csrc/**/*.h", recursive=True)) + ["src/fastpunch/_cdefs.pxd"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

setup(
    ext_modules=cythonize(
        [engine],
        compiler_directives={"language_level": "3", "embedsignature": True},
        include_path=["src"],
    ),
)
