"""The CPU kernels of the FlowServe step: build once, load everywhere.

`flowserve/kernels.cpp` holds two float32 ops, an in-place RoPE and a decode attention
that reads K/V through the block table; `flowserve.model` calls them on the CPU, where
they replace a gather of every decode sequence's blocks (the step's largest cost after
the matmuls). They are compiled with torch's cpp_extension into `flowserve/_build/`
(keyed by the source's hash) by `make install`, or by the first process that needs them;
later processes only load the library (milliseconds), and forked TEs inherit it from the
template. Without a compiler the engine keeps its plain torch path.

    python -m flowserve.kernels          (build and load; exit status 1 if they cannot be)
"""
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger("flowserve.kernels")
SOURCE = Path(__file__).with_suffix(".cpp")
# AVX2 and FMA exist on every x86-64 server CPU of the last decade; no -march=native, so a
# build stays valid on another machine. -ffast-math lets the softmax's exp vectorize.
CFLAGS = ["-O3", "-fopenmp", "-ffast-math"] + (["-mavx2", "-mfma"] if platform.machine() == "x86_64" else [])
_loaded: bool | None = None


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    return Path(__file__).parent / "_build" / f"kernels-{digest}" / "deepflow_kernels.so"


def build_and_load() -> None:
    """Compile the library into the cache (about 20 s) and load it."""
    from torch.utils import cpp_extension
    so = library_path()
    so.parent.mkdir(parents=True, exist_ok=True)
    # cpp_extension drives ninja; the `ninja` wheel puts it beside the interpreter
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cpp_extension.load(so.stem, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                       build_directory=str(so.parent), is_python_module=False)


def available() -> bool:
    """Load the kernels (building them if needed) once per process; False where they cannot be."""
    global _loaded
    if _loaded is None:
        try:
            so = library_path()
            if so.exists():
                torch.ops.load_library(str(so))
            else:
                log.warning("building the CPU kernels into %s (once)", so.parent)
                build_and_load()
            _loaded = True
        except Exception as e:  # no compiler, read-only cache, ...: the torch path still works
            log.warning("CPU kernels unavailable, using the plain torch path: %s", e)
            _loaded = False
    return _loaded


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    sys.exit(0 if available() else 1)
