"""The fused/compiled MoE-LoRA paths lay routed rows out ragged (a matmul loop per expert) or padded (batched
matmuls): both equal the autograd loop, gradients included, with and without LoRA dropout in eval."""

import pytest
import torch
from student_fixtures import assert_layer_matches_loop, loop_and_fast_layers

from student.fused_experts import padded_capacity


@pytest.mark.parametrize("impl,max_padding", [("fused", 0.0), ("fused", 100.0), ("compiled", 100.0)])
def test_ragged_and_padded_layouts_match_the_loop(impl, max_padding):
    loop, fast = loop_and_fast_layers(impl)
    fast.max_padding = max_padding
    x = torch.randn(3, 11, 32)
    assert_layer_matches_loop(loop, fast, x)


def test_padded_capacity():
    assert padded_capacity([500, 520, 510, 530], 1.3) == 536  # rounded up to 8, 5 % padding
    assert padded_capacity([10, 200, 10, 10], 1.3) is None  # unbalanced: the ragged loop
    assert padded_capacity([5, 5], 0.0) is None
