"""The fused layer's matrix products on CPU: oneDNN where torch's default is slower.

torch multiplies float32 matrices on CPU with MKL, and MKL runs its AVX2 code on AMD
CPUs even where they have AVX-512 (Zen 4, Zen 5). oneDNN, which ships inside the same
torch, uses the widest vectors the CPU has. A routed layer's training step is mostly
small, skinny products, so this is where its time goes (bench/routing.py measures the
difference; the README reports it). Which is faster is measured, not guessed from the
vendor: see "auto" below.

`Products(onednn)` has `linear`, `addmm` and `addmm_`, which compute what F.linear,
torch.addmm and Tensor.addmm_ compute (the same numbers up to float rounding); with
`onednn` true they use oneDNN for float32 CPU tensors with at least MIN_ROWS rows,
outside autograd. `products()` reads LORAFUSE_ONEDNN once, when a plan is chosen:
- "auto" (the default): where oneDNN is at least 10% faster on the fused layer's kind of
  products, timed once per machine (CPU, torch version, thread count; about 0.2 s) and
  kept in the kernel cache folder (fast.kernels.cache_dir), so every process on the
  machine makes the same choice and gets the same numbers; a process of a launch
  (WORLD_SIZE > 1) never times (ranks timing at once could choose apart): it reads the
  kept answer, else takes oneDNN on AMD CPUs with AVX-512 (where MKL runs its AVX2 code);
- "1": on every CPU; "0": never (torch's own products everywhere).
oneDNN builds (JIT-compiles) a kernel per shape and caches it, so the row count is
padded up to a bucket (8 per power of two, at most 1/8 more rows): batches of varying
length then reuse a few hundred kernels instead of building one per batch. The padding
rows are zeros and their results are dropped (only output rows are padded, never a
summed dimension). On first use a small product is checked against F.linear; if oneDNN
is missing or disagrees, torch's products are used (with a warning when
LORAFUSE_ONEDNN=1 asked for oneDNN).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafuse.parallel import launched

SWITCH = "LORAFUSE_ONEDNN"
MIN_ROWS = 64  # below this (decoding, tiny batches) MKL's small-matrix code is faster
_state: dict[str, bool] = {}


class Products:
    """The fused layer's matrix products, on oneDNN (`onednn`, where _use allows) or torch's."""

    def __init__(self, onednn: bool):
        self.onednn = onednn

    def linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (M, K) @ w^T (K, N) (+ bias (N,)) -> (M, N), as F.linear (w may be a view)."""
        return _padded_linear(x, w, bias) if self.onednn and _use(x, w) else F.linear(x, w, bias)

    def addmm(self, y: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """y (M, N) + a (M, K) @ b (K, N), a new tensor, as torch.addmm."""
        if self.onednn and _use(a, b):
            return _padded_linear(a, b.T).add_(y)
        return torch.addmm(y, a, b)

    def addmm_(self, y: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """y += a (M, K) @ b (K, N) in place, as Tensor.addmm_; returns y."""
        if self.onednn and _use(a, b):
            return y.add_(_padded_linear(a, b.T))
        return y.addmm_(a, b)

    def __repr__(self) -> str:
        return "oneDNN" if self.onednn else "torch"


TORCH = Products(False)  # torch's own products (autograd-safe everywhere)


def products() -> Products:
    """The products LORAFUSE_ONEDNN asks for on this CPU (read now; see the module doc)."""
    return Products(enabled())


def _padded_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    # oneDNN's product with the rows padded to a bucket (kernels are cached per shape).
    M = x.shape[0]
    Mp = bucket(M)
    if Mp != M:  # zero rows up to the bucket: a kernel already built for Mp serves
        xp = x.new_empty(Mp, x.shape[1])
        xp[:M].copy_(x)
        xp[M:].zero_()
        x = xp
    y = onednn_linear(x, w, bias)  # (Mp, N)
    return y[:M] if Mp != M else y


def onednn_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """oneDNN's x (M, K) @ w^T (+ bias), exactly as given (no padding, no checks)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def bucket(M: int) -> int:
    """M rounded up to a multiple of 1/8 of the power of two below it (M for M < 64)."""
    if M < MIN_ROWS:
        return M
    step = (1 << (M.bit_length() - 1)) // 8  # (2^floor(log2 M)) / 8
    return -(-M // step) * step


def enabled() -> bool:
    """Whether oneDNN computes the products here (LORAFUSE_ONEDNN, the CPU, a check)."""
    mode = os.environ.get(SWITCH, "auto").strip().lower()
    if mode not in _state:
        if mode in ("0", "false", "off", "no"):
            _state[mode] = False
        elif mode in ("1", "true", "on", "yes"):
            _state[mode] = _works(warn=True)
        else:
            _state[mode] = _works(warn=False) and _faster()
    return _state[mode]


def _faster() -> bool:
    # Whether oneDNN beats torch's products here by 10%: measured once per machine,
    # CPU, torch and thread count, and kept in a small file (written atomically).
    from lorafuse.fast import kernels

    what = f"{kernels._cpu()} torch {torch.__version__} threads {torch.get_num_threads()}"
    key = hashlib.sha256(what.encode()).hexdigest()[:16]
    path = kernels.cache_dir() / f"onednn-{key}.json"
    try:
        return bool(json.loads(path.read_text())["onednn"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if launched():  # processes timing at once on shared cores could decide apart
        return _amd_avx512()  # and compute apart: a fixed rule, the same on every rank
    onednn, torch_s = measure()
    faster = onednn < 0.9 * torch_s
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        record = {"onednn": faster, "onednn_s": onednn, "torch_s": torch_s, "machine": what}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measured again by the next process
    return faster


def _amd_avx512() -> bool:
    # An AMD CPU with AVX-512, where MKL takes its AVX2 path: the rule when not measured.
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return "AuthenticAMD" in head and " avx512f" in head


def measure(rounds: int = 5) -> tuple[float, float]:
    """(oneDNN, torch) median seconds of a routed layer's kind of products: a joint GEMM
    (512, 1024) x (1024, 1024 + 160) and the skinny (512, 160) x (160, 1024)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 1024, generator=g), torch.randn(1184, 1024, generator=g)
    z, b = torch.randn(512, 160, generator=g), torch.randn(1024, 160, generator=g)
    ways = {
        "onednn": lambda: (_padded_linear(x, w), _padded_linear(z, b)),
        "torch": lambda: (F.linear(x, w), F.linear(z, b)),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    with torch.no_grad():
        for way in ways.values():
            way()  # warm-up: oneDNN builds its kernels
        for r in range(rounds):
            for name in list(ways)[:: 1 if r % 2 else -1]:
                t0 = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["onednn"]), statistics.median(times["torch"])


def _use(x: Tensor, w: Tensor) -> bool:
    return (
        x.dim() == 2
        and x.shape[0] >= MIN_ROWS
        and x.device.type == "cpu"
        and x.dtype == w.dtype == torch.float32
        and not torch.is_grad_enabled()  # no autograd through oneDNN's op: lorafuse's
    )  # own Functions (and inference) call these


def _works(warn: bool) -> bool:
    # oneDNN's linear is there and agrees with F.linear on a small product.
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(MIN_ROWS, 24, generator=g), torch.randn(40, 24, generator=g)
        b = torch.randn(40, generator=g)
        y = onednn_linear(x, w.T.contiguous().T, b)
        ok = torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-5)
        why = "its results differ from torch's"
    except Exception as e:  # no oneDNN in this torch, or another signature
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok and warn:
        warnings.warn(
            f"lorafuse: oneDNN's matrix products are not usable here ({why}); torch's own "
            f"are used instead (same results). Unset {SWITCH} to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


def cpu_line() -> str:
    """The CPU's model and the vector flags that decide its products (for benchmarks)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({' '.join(shown) or 'flags unknown'})"
