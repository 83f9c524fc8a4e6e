"""check_values: the one shape-and-finite check, on tensors and numpy arrays alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.values import check_values

FIX = "pass one per expert"


@pytest.mark.parametrize("values", [torch.ones(2, 3), np.ones((2, 3)), torch.ones(4, 3).half()])
def test_a_good_shape_of_finite_values_passes(values):
    check_values(values, "x", [(None, 3), (2, None, None)], "(B, 3)", FIX)


@pytest.mark.parametrize(
    ("values", "shapes", "said"),
    [
        (torch.ones(2), [(3,)], r"x must be \(3,\); got \[1.0, 1.0\]; pass one per expert"),
        (torch.ones(9), [(3,)], r"got shape \(9,\)"),  # many values: the shape instead
        (np.ones((2, 0)), [(None, None)], r"got \[\[\], \[\]\]"),  # None means at least 1
        (torch.ones(3, 1), [(3,)], r"got \[\[1.0\], \[1.0\], \[1.0\]\]"),
    ],
)
def test_a_wrong_shape_is_named_with_the_fix(values, shapes, said):
    with pytest.raises(LorafuseError, match=said):
        check_values(values, "x", shapes, "(3,)", FIX)


def test_the_first_nan_or_inf_is_named_by_index_or_axis():
    x = torch.zeros(2, 3)
    x[1, 2], x[0, 1] = float("nan"), float("inf")
    with pytest.raises(LorafuseError, match=r"NaN or Inf in x \(first at index \[0, 1\]: inf\)"):
        check_values(x, "x", [(2, 3)], "(2, 3)", FIX)
    with pytest.raises(LorafuseError, match=r"first at expert 0, task 1: inf\); pass one"):
        check_values(x.numpy(), "x", [(2, 3)], "(2, 3)", FIX, axes=("expert", "task"))
