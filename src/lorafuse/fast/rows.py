"""JointRows: one buffer [W ; A ; room] so that one GEMM reads x once for everything.

Memory traffic, not arithmetic, is what the experts cost on top of W x, so the plans
read x once: one buffer holds the rows [W ; A ; P] (O + N*R + N, D) and one GEMM gives
the base output, the experts' projections u = x A^T and, for a projected mixer
(lorafuse.mixers.protocol), the mixer's p = x P^T. The base layer's weight and bias and
the layer's A rows are views of that buffer: nothing is stored twice, and the base layer
stays an ordinary nn.Linear with the same parameters. A base whose output is not exactly
F.linear(x, W, b) (a GPT-2 Conv1D stores W as (D, O); a quantized or custom layer) keeps
its own product, and only the experts' and the mixer's rows share the buffer. The
mixer's projection is copied into the N rows after the experts' (the room) when it
changes (`sync`).

The buffer ends in ALIGN - 1 rows of zeros, so that an inference GEMM can take a
multiple of ALIGN rows (`slices(..., aligned=True)`): its extra output columns are
zeros (or the unused room) that nothing reads. CPU BLAS libraries (MKL here) run a
product with 2,610 output columns (Phi-2's 2,560 + 10 experts x (4 + 1)) up to 10%
slower than one with 2,624.

The buffer is built once per layer and kept in `layer.state` across plans (a new mixer
does not copy W again); a move of the layer drops it (FusedLoRALinear._apply).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

ALIGN = 16  # rows of an aligned GEMM: a multiple of this (64 bytes of float32 per column)


class JointRows:
    """The buffer [W ; A ; room] of one fused layer (see the module doc).

    `join_base`: the base layer's weight and bias become the first O rows (only for a
    base whose output is exactly F.linear, in the layer's dtype and device).
    """

    def __init__(self, layer: nn.Module, join_base: bool):
        base, A = layer.base, layer.A_rows  # A (N*R, D)
        N, D, O = layer.num_experts, A.shape[1], layer.out_features
        w, b = base.weight, getattr(base, "bias", None)
        join = join_base and w.dtype == A.dtype and w.device == A.device
        with torch.no_grad(), torch.inference_mode(False):
            pad = ALIGN - 1  # zero rows past the room, for aligned slices
            rows = torch.cat([*([w.detach()] if join else []), A, A.new_zeros(N + pad, D)])
            row_bias = None
            if join and b is not None:
                row_bias = torch.cat([b.detach(), A.new_zeros(rows.shape[0] - O)])
            if join:
                w.data = rows[:O]
                if b is not None:
                    b.data = row_bias[:O]
            self.top = O if join else 0  # O when W's rows are in the buffer
            layer.A_rows = rows[self.top : self.top + A.shape[0]]
        self.join_base = join_base  # as asked (top says whether it could be done)
        bias_at = row_bias.data_ptr() if row_bias is not None else None
        self._pointers = (rows[self.top].data_ptr(), rows.data_ptr(), bias_at)  # A, W, b
        self.rows, self.row_bias = rows, row_bias  # (top + N*R + N + pad, D), (same,)
        self.experts = A.shape[0]  # N*R
        self.room = N  # rows for a projected mixer's map (P <= N), after the experts'
        self._room_at = self.top + self.experts
        self._synced: tuple | None = None  # (tensor ref, version, address) copied last

    def holds(self, layer: nn.Module) -> bool:
        """Whether the layer's A rows (and W and b, when joined) are still this buffer's:
        a few pointer comparisons (read through the modules' own dicts: this runs on
        every call)."""
        if layer._buffers["A_rows"].data_ptr() != self._pointers[0]:
            return False
        if not self.top:
            return True
        params = layer._modules["base"]._parameters
        w, b = params["weight"], params.get("bias")
        if w.data_ptr() != self._pointers[1]:
            return False
        return b is None or b.data_ptr() == self._pointers[2]

    def slices(
        self, with_base: bool, P: int, aligned: bool = False
    ) -> tuple[Tensor, Tensor | None, tuple]:
        """(weight rows, bias rows, output widths (O or 0, N*R, P)) of one GEMM.

        `aligned`: a multiple of ALIGN rows, the last ones zeros or unused room, whose
        output columns past the widths' sum are not read (the output is then wider than
        the widths say: split it after slicing off those columns).
        """
        base = with_base and self.top > 0
        start, stop = (0 if base else self.top), self.top + self.experts + P
        if aligned:
            stop = start + -(-(stop - start) // ALIGN) * ALIGN  # <= len(rows): pad rows
        bias = self.row_bias[start:stop] if base and self.row_bias is not None else None
        return self.rows[start:stop], bias, (self.top if base else 0, self.experts, P)

    def fits(self, proj: Tensor) -> bool:
        """Whether a mixer's projection (P, D) fits the room rows (shape, dtype, device)."""
        room = self.rows[self._room_at : self._room_at + self.room]
        return (
            proj.dim() == 2
            and proj.shape[0] <= self.room
            and proj.shape[1] == room.shape[1]
            and proj.dtype == room.dtype
            and proj.device == room.device
        )

    def sync(self, proj: Tensor) -> None:
        """Copy the projection (P, D) into the room rows if it changed since the last copy
        (a new tensor, an in-place update, a new storage); no device sync."""
        seen = self._synced
        if seen and seen[0]() is proj and seen[1:] == (proj._version, proj.data_ptr()):
            return
        with torch.no_grad():
            self.rows[self._room_at : self._room_at + proj.shape[0]].copy_(proj)
        self._synced = (weakref.ref(proj), proj._version, proj.data_ptr())


def joint_rows(layer: nn.Module, join_base: bool) -> JointRows:
    """The layer's JointRows, built once and kept in `layer.state` while it still holds."""
    rows = layer.state.get("rows")
    if rows is None or rows.join_base != join_base or not rows.holds(layer):
        rows = layer.state["rows"] = JointRows(layer, join_base)
    return rows
