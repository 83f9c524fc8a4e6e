"""JointPath: the fused layer's fast path, equal to its reference forward by test.

Memory traffic, not arithmetic, is what the experts cost on top of W x, so x is read
once: one buffer holds the rows [W ; A ; P] (O + N*R + N, D) and one GEMM gives the
base output, the experts' projections u = x A^T and, for a projected mixer
(lorafuse.mixers.protocol), the mixer's p = x P^T. The base layer's weight and bias and
the layer's A rows are views of that buffer: nothing is stored twice, and the base layer
stays an ordinary nn.Linear with the same parameters. A GPT-2 Conv1D keeps its weight
(stored (D, O), it cannot be rows), so only the experts' and the mixer's rows share a
GEMM. The mixer's projection is copied into the last N rows when it changes.

On top of the joint GEMM, per call:
- without autograd the second GEMM accumulates into the base output in place (the
  output is a row-strided view of the joint GEMM's output);
- with autograd, hand-written Functions (fast.functions): Project, Mix, and Routed, the
  whole layer for a softmax router (compiled kernels on CPU, fast.kernels);
- per-sequence coefficients using few experts per row gather them (fast.sparse);
- on a multi-threaded CPU, small inputs run the base layer apart (`_base_joins`);
- products go through fast.gemm (oneDNN where MKL is slow).

The base layer's parameters are the source of truth: moving or casting the layer
(`.to()`, `.half()`) drops the buffer, and the next call builds it again from them.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from lorafuse.fast import gemm, kernels, sparse
from lorafuse.fast.functions import Mix, Project, Routed
from lorafuse.mixers.protocol import ProjectedMixer, SoftmaxRouter

SERIAL_GEMM = 3 * 2**16  # MKL (2024.2) threads an (M, D) x (D, O) sgemm from M*D*O ~ this


class JointPath(nn.Module):
    """The fast forward of one FusedLoRALinear (see the module doc); `forward` may decline.

    `forward(layer, x, mixer)` returns the layer's output (..., O), or None when this path
    does not take the call (autocast, or x's dtype not the layer's): the layer then runs
    its reference formula. `join_base`: the base layer's rows join the GEMM.
    """

    def __init__(self, layer: nn.Module, join_base: bool):
        super().__init__()
        self.join_base = join_base
        self.rows: Tensor | None = None  # (top + N*R + N, D): [W ; A ; room for P]
        self.row_bias: Tensor | None = None  # (top + N*R + N,): [b ; 0], with W only
        self.top = 0  # O when W's rows are in the buffer, else 0
        self.room = layer.num_experts  # rows for a projected mixer's map (P <= N)
        self._plans: dict = {}  # (fuse_base, P) -> the GEMM's rows, see _rows
        self._synced: tuple | None = None  # the projection copied last, see _projection
        self._kind: tuple = (None, False, False)  # (mixer, projected, softmax router)
        self._build(layer)

    def forward(self, layer: nn.Module, x: Tensor, mixer) -> Tensor | None:
        if self.rows is None:  # dropped by a move: build it again from the base layer
            self._build(layer)
        if x.dtype != self.rows.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        base, B_cat = layer.base, layer.B_cat
        w, b = base.weight, base.bias
        N, R, O, space = layer.num_experts, layer.rank, layer.out_features, layer.space
        lead = x.shape[:-1]
        proj = self._projection(mixer, x)  # (P, D) or None: then the mixer runs on x
        c = None
        if proj is None:
            c = mixer(x)
            if sparse.applies(c, x, N):
                d = sparse.delta(layer, x, c.to(x.dtype))  # (B, T, O)
                y = self._base(base, x)
                return y + d if y.requires_grad or c.requires_grad else y.add_(d)
        x2 = x.reshape(-1, x.shape[-1])  # (M, D)
        P = 0 if proj is None else proj.shape[0]
        fuse_base = self._joined(w, b) and self._base_joins(layer, w, b, x2, P)
        weight, bias, widths = self._rows(fuse_base, P)
        grad = torch.is_grad_enabled() and (x.requires_grad or (P and proj.requires_grad))
        rbias = self._softmax_bias(mixer, x) if grad and fuse_base and P == N else None
        if rbias is not None:  # a softmax router: the whole layer in one Function
            args = (B_cat, widths, space, bool(mixer.absolute))
            return Routed.apply(x2, weight, bias, proj, rbias, *args).view(*lead, O)
        if grad:
            y, u, p = Project.apply(x2, weight, bias, proj, widths)
        else:
            joint = gemm.linear(x2, weight, bias)  # (M, O or 0 + R*N + P)
            y, u, p = joint.split_with_sizes(widths, -1)
        # y (M, O) (width 0 if the base runs apart), u (M, R*N), p (M, P)
        if not fuse_base:
            y = base(x).reshape(-1, O)  # (M, O)
        if not torch.is_grad_enabled() and P == N:  # a softmax router, by the kernels?
            z = self._kernel_mix(mixer, joint, widths, B_cat, space)  # (M, R*N) or None
            if z is not None:
                return gemm.addmm_(y, z, B_cat).view(*lead, O)
        if c is None:
            l = mixer.from_projection(p.view(*lead, P)).reshape(-1, N)  # (M, N)
        else:
            l = layer.token_coefficients(c, x)  # (N,) or (M, N)
        if torch.is_grad_enabled() and (y.requires_grad or u.requires_grad or l.requires_grad):
            l = l.expand(y.shape[0], N)  # (M, N)
            return Mix.apply(y, u.unflatten(-1, (R, N)), l, B_cat, space).view(*lead, O)
        # No autograd here: the second GEMM accumulates straight into the base output.
        return gemm.addmm_(y, _mix(u, l, R, N, space), B_cat).view(*lead, O)

    def _build(self, layer: nn.Module) -> None:
        # The buffer [W ; A ; room] from the base layer and the layer's A rows, which
        # become views of it (so do W and b when they join).
        base, A = layer.base, layer.A_rows  # A (N*R, D)
        N, D, O = layer.num_experts, A.shape[1], layer.out_features
        w, b = base.weight, getattr(base, "bias", None)
        join = self.join_base and w.dtype == A.dtype and w.device == A.device
        with torch.no_grad(), torch.inference_mode(False):
            rows = torch.cat([*([w.detach()] if join else []), A, A.new_zeros(N, D)])
            row_bias = None
            if join and b is not None:
                row_bias = torch.cat([b.detach(), A.new_zeros(rows.shape[0] - O)])
            self.top = O if join else 0
            if join:
                w.data = rows[:O]
                if b is not None:
                    b.data = row_bias[:O]
            layer.A_rows = rows[self.top : self.top + A.shape[0]]
        self.rows, self.row_bias = rows, row_bias
        self._plans, self._synced = {}, None

    __call__ = forward  # no module hooks: it runs on every call of the layer

    def _joined(self, w: Tensor, b: Tensor | None) -> bool:
        # Whether the base layer's weight w and bias b are still the buffer's first rows
        # (not replaced, released or taken by another fused layer).
        if not self.top or w.data_ptr() != self.rows.data_ptr():
            return False
        return b is None or (self.row_bias is not None and b.data_ptr() == self.row_bias.data_ptr())

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: the base layer and the A rows move on their own (as the
        # fused layer's child and buffer); this buffer is rebuilt from them at the next call.
        self.rows = self.row_bias = None
        return self

    def _rows(self, fuse_base: bool, P: int) -> tuple[Tensor, Tensor | None, tuple]:
        # (weight rows, bias rows, output widths) of the GEMM, kept per (fuse_base, P).
        key = (fuse_base, P)
        if key not in self._plans:
            NR = self.rows.shape[0] - self.top - self.room  # N*R
            start, stop = (0 if fuse_base else self.top), self.top + NR + P
            bias = self.row_bias[start:stop] if fuse_base and self.row_bias is not None else None
            widths = (self.top if fuse_base else 0, NR, P)
            self._plans[key] = (self.rows[start:stop], bias, widths)
        return self._plans[key]

    def _kinds(self, mixer) -> tuple[bool, bool]:
        # (is a ProjectedMixer, is a SoftmaxRouter), checked once per mixer.
        if self._kind[0] is not mixer:
            projected = isinstance(mixer, ProjectedMixer)
            self._kind = (mixer, projected, projected and isinstance(mixer, SoftmaxRouter))
        return self._kind[1], self._kind[2]

    def _projection(self, mixer, x: Tensor) -> Tensor | None:
        # The mixer's linear map (P, D) once copied into the buffer's room rows, else None.
        if not self._kinds(mixer)[0]:
            return None
        proj = mixer.projection
        seen = self._synced  # (tensor, version, address, x dtype, answer) of the last call
        if seen and seen[0]() is proj and seen[1:4] == (proj._version, proj.data_ptr(), x.dtype):
            return seen[4]
        room = self.rows[self.rows.shape[0] - self.room :]  # (N, D)
        fits = (
            proj.dim() == 2
            and proj.shape[0] <= room.shape[0]
            and proj.shape[1] == room.shape[1]
            and proj.dtype == room.dtype == x.dtype
            and proj.device == room.device
        )
        if fits:
            with torch.no_grad():
                room[: proj.shape[0]].copy_(proj)
        answer = proj if fits else None
        self._synced = (weakref.ref(proj), proj._version, proj.data_ptr(), x.dtype, answer)
        return answer

    def _softmax_bias(self, mixer, x: Tensor) -> Tensor | None:
        # The bias b (N,) of a softmax router (coefficients softmax(|p| + b) or
        # softmax(p + b)) if its dtype and device are x's; else None.
        if not self._kinds(mixer)[1]:
            return None
        b = mixer.softmax_bias
        return b if b is not None and b.dtype == x.dtype and b.device == x.device else None

    def _kernel_mix(self, mixer, joint: Tensor, widths, B_cat: Tensor, space: str):
        # z (M, R*N) for a softmax router by the compiled kernel (CPU, float32), else None;
        # joint is the GEMM's output (M, O or 0 + R*N + N), the router's p its last N columns.
        rbias = self._softmax_bias(mixer, joint)
        kern = None if rbias is None else kernels.for_tensors(joint, rbias, B_cat)
        if kern is None:
            return None
        return kernels.forward(kern, joint, rbias, widths, space, bool(mixer.absolute))[2]

    def _base(self, base: nn.Module, x: Tensor) -> Tensor:
        # base(x); without autograd a plain nn.Linear's product is fast.gemm's (oneDNN
        # where MKL is slow), as the joint GEMM's is.
        plain = type(base) is nn.Linear and x.dtype == base.weight.dtype
        if not plain or torch.is_grad_enabled():
            return base(x)
        y = gemm.linear(x.reshape(-1, x.shape[-1]), base.weight, base.bias)  # (M, O)
        return y.view(*x.shape[:-1], base.weight.shape[0])

    def _base_joins(self, layer: nn.Module, w: Tensor, b: Tensor | None, x2: Tensor, P: int):
        # Whether the base layer (weight w, bias b; its rows are in the buffer) joins this
        # call's GEMM: not when it trains (autograd must see its own parameters), nor when
        # it does not pay.
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return False
        # On a multi-threaded CPU MKL threads a GEMM past M*D*O ~ SERIAL_GEMM, and each
        # parallel region waits for a second core (long on a busy machine): when decoding
        # a few tokens through a small layer, two serial GEMMs beat one threaded one.
        if not x2.is_cpu or torch.get_num_threads() == 1 or x2.shape[0] == 1:
            return True  # (a GEMV, M = 1, is threaded from a few thousand weights anyway)
        MD, O, NR = x2.numel(), layer.out_features, layer.num_experts * layer.rank
        return MD * O >= SERIAL_GEMM or MD * (O + NR + P) < SERIAL_GEMM


def _mix(u: Tensor, l: Tensor, R: int, N: int, space: str) -> Tensor:
    # z (M, R*N) with delta = z @ B_cat, from u = x A^T (M, R*N), l (N,) or (M, N); batched
    # matmuls along N, which win for the few tokens of decoding.
    u = u.unflatten(-1, (R, N))  # (M, R, N)
    lr = l.unsqueeze(-2)  # (1, N) or (M, 1, N)
    if space == "deltas":
        return (u * lr).flatten(-2)  # (M, R*N): l_i A_i x
    h = torch.bmm(u, l.unsqueeze(-1)) if l.dim() == 2 else u @ l.unsqueeze(-1)  # (M, R, 1)
    return (h * lr).flatten(-2)  # (M, R*N): l_i (sum_j l_j A_j) x
