"""Compiled CPU kernels for the routed layer (fast/csrc/routed.c), built on first use.

A softmax router's training step does, between the layer's two GEMMs, about ten
elementwise passes over a (tokens, R, N) tensor when written with torch ops; on CPU
those passes cost as much as the GEMMs. `routed.c` does the same arithmetic in one pass
over each token. It has no Python or torch headers: the system's C compiler builds it
once into a per-user cache, keyed by the source, the compiler, its flags,
the CPU and the OpenMP runtime, and ctypes calls it with the tensors' data pointers.
Where torch runs on an OpenMP runtime (Linux: read from /proc/self/maps), the kernels
are linked to that same library, so they share torch's threads rather than start a
second pool; if that build fails they are built serial.

Every use is optional: on another device or dtype, with no C compiler, when the build
fails, or with LORAFUSE_CPU_KERNELS=0 (read by `for_plan`, when a plan is chosen), there
are no kernels and the layer runs its torch ops (lorafuse.fast.functions), which compute
the same numbers. The cache lives in
$LORAFUSE_CACHE, else $XDG_CACHE_HOME/lorafuse, else ~/.cache/lorafuse.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "routed.c"
FLAGS = (
    "-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math", "-fopenmp-simd", "-shared", "-fPIC",
)  # fmt: skip
SWITCH = "LORAFUSE_CPU_KERNELS"  # "0" turns the kernels off (read when a plan is chosen)
BLOCK = 64  # tokens per partial sum of the bias gradient: the same sum on any thread count

_lock = threading.Lock()
_loaded: dict[str, RoutedKernels | None] = {}
_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


class RoutedKernels:
    """ctypes bindings of routed.c's two functions (argument order as in the C file)."""

    def __init__(self, lib: ctypes.CDLL, path: Path, openmp: str | None):
        self.path, self.openmp = path, openmp  # openmp: the runtime linked, or None (serial)
        self.forward = lib.lf_routed_forward
        self.forward.argtypes = [_I64, _I64, _I64, _PTR, _I64, _PTR, _INT, _PTR, _I64, _INT,
                                 _PTR, _PTR, _PTR]  # fmt: skip
        self.forward.restype = None
        self.backward = lib.lf_routed_backward
        self.backward.argtypes = [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR,
                                  _PTR, _I64, _INT, _INT, _PTR, _I64, _PTR, _I64,
                                  _PTR]  # fmt: skip
        self.backward.restype = None


def routed() -> RoutedKernels | None:
    """The compiled routed-layer kernels, or None where they cannot be had (see above).

    Builds them on the first call of a process (a warning says why if that fails) and
    loads the cached library afterwards. Thread-safe; never raises.
    """
    key = str(SOURCE)
    if key in _loaded:
        return _loaded[key]
    with _lock:
        if key not in _loaded:
            try:
                path, openmp = _build()
                _loaded[key] = RoutedKernels(ctypes.CDLL(str(path)), path, openmp)
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                warnings.warn(
                    f"lorafuse: the CPU kernels in {SOURCE.name} were not built ({e}); the "
                    f"routed layer runs torch ops instead (same results, slower). Set CC to a "
                    f"working C compiler, or {SWITCH}=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _loaded[key] = None
    return _loaded[key]


def for_plan(device: torch.device, dtype: torch.dtype) -> RoutedKernels | None:
    """The kernels for a plan computing in float32 on CPU, unless LORAFUSE_CPU_KERNELS=0
    (read now) or they could not be built; else None."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    return routed() if dtype == torch.float32 and device.type == "cpu" else None


def forward(kern: RoutedKernels, out: Tensor, rbias: Tensor, widths, space: str, absolute: bool):
    """(l (M, N), h (M, R) or None, z (M, R*N)) from the joint GEMM's output.

    out (M, O + R*N + N) = [base output ; u ; p] (rows may be strided), rbias (N,)
    contiguous, widths (O, R*N, N); h is returned in the factors space only.
    """
    O, NR, N = widths
    M, R, at, f = out.shape[0], NR // N, out.data_ptr(), out.element_size()
    factors = space == "factors"
    l, z = out.new_empty(M, N), out.new_empty(M, NR)
    h = out.new_empty(M, R) if factors else None
    kern.forward(M, R, N, at + f * (O + NR), out.stride(0), rbias.data_ptr(), absolute,
                 at + f * O, out.stride(0), factors, l.data_ptr(),
                 h.data_ptr() if factors else None, z.data_ptr())  # fmt: skip
    return l, h, z


def mixed(kern: RoutedKernels, out: Tensor, rbias: Tensor, widths, factors: bool,
          absolute: bool) -> Tensor:  # fmt: skip
    """z (M, R*N) alone, as `forward` computes it (inference: l and h are not kept, so
    none is allocated; decoding calls this per layer and token, where that counts)."""
    O, NR, N = widths
    M, at, s, f = out.shape[0], out.data_ptr(), out.stride(0), 4  # float32 (for_plan)
    z = out.new_empty(M, NR)
    kern.forward(M, NR // N, N, at + f * (O + NR), s, rbias.data_ptr(), absolute, at + f * O,
                 s, factors, None, None, z.data_ptr())  # fmt: skip
    return z


def backward(kern: RoutedKernels, g: Tensor, gz: Tensor, out: Tensor, l: Tensor, h, G: Tensor,
             widths, space: str, absolute: bool) -> Tensor:  # fmt: skip
    """Fill G (M, O + R*N + N) with [g ; gu ; gp]; return the bias gradient (N,).

    g (M, O) and gz (M, R*N) contiguous, out, l and h as `forward` read and returned.
    """
    O, NR, N = widths
    M, at, f = g.shape[0], out.data_ptr(), out.element_size()
    gbias, part = g.new_empty(N), g.new_empty(-(-M // BLOCK), N)  # part: per block of tokens
    kern.backward(M, NR // N, N, O, g.data_ptr(), gz.data_ptr(), at + f * O, out.stride(0),
                  l.data_ptr(), None if h is None else h.data_ptr(), at + f * (O + NR),
                  out.stride(0), absolute, space == "factors", G.data_ptr(),
                  G.stride(0), gbias.data_ptr(), BLOCK, part.data_ptr())  # fmt: skip
    return gbias


def cache_dir() -> Path:
    """Where built kernels are kept: $LORAFUSE_CACHE, $XDG_CACHE_HOME/lorafuse or ~/.cache."""
    if os.environ.get("LORAFUSE_CACHE"):
        return Path(os.environ["LORAFUSE_CACHE"]) / "kernels"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lorafuse" / "kernels"


def compiler() -> list[str]:
    """The C compiler command: $CC, else the one Python was built with, else `cc`."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _build() -> tuple[Path, str | None]:
    # (library, OpenMP runtime or None): compiled into the cache once per source,
    # compiler, flags, CPU and runtime; written to a temporary name and renamed, so
    # processes building at once never see half a file.
    cc = compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, timeout=60, check=True)
    folder = cache_dir()
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    error = None
    for openmp in dict.fromkeys([_openmp_runtime(), None]):
        key = hashlib.sha256(
            b"\0".join([SOURCE.read_bytes(), " ".join([*cc, *FLAGS]).encode(), version.stdout,
                        _cpu().encode(), str(openmp).encode()])
        ).hexdigest()[:16]  # fmt: skip
        target = folder / f"routed-{key}{suffix}"
        if target.exists():
            return target, openmp
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _compile(cc, folder, target, openmp)
            return target, openmp
        except RuntimeError as e:
            error = e
    raise error


def _compile(cc: list[str], folder: Path, target: Path, openmp: str | None) -> None:
    # With a runtime: compile with -fopenmp, then link against that very file (not the
    # compiler's own libgomp, which would be a second pool of threads).
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "routed.o", Path(tmp) / target.name
        omp = ["-fopenmp"] if openmp else []
        link = [openmp, f"-Wl,-rpath,{Path(openmp).parent}"] if openmp else []
        for cmd in ([*cc, *FLAGS, *omp, "-c", str(SOURCE), "-o", str(obj)],
                    [*cc, *FLAGS, str(obj), *link, "-o", str(lib)]):  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cc)} failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, target)


def _openmp_runtime() -> str | None:
    # The OpenMP library this process has loaded (torch's), from /proc/self/maps.
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/" in line})
    except OSError:
        return None
    names = ("libgomp", "libiomp5", "libomp")
    return next((p for p in paths if os.path.basename(p).startswith(names)), None)


def _cpu() -> str:
    # What -march=native depends on: the machine and, on Linux, the CPU's feature flags.
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"
