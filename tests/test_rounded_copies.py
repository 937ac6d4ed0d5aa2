"""The float16 rounded-copies rule for gradients of prompts the official float32 paths round."""

import torch

from alignednorm.compat.rounded_copies import compare_rounded_copies, per_copy_gradients
from alignednorm.methods import maple

TOL = {"gradients_rel": 1e-4}


def _rounded_sum(copies):
    return copies.half().float().sum(0)


def test_a_copy_at_a_float16_boundary_may_round_either_way():
    step = 2.0 ** -16  # float16 spacing in [2^-6, 2^-5)
    boundary = float(torch.tensor(0.02).half()) + step / 2  # halfway between two float16 values
    copies = torch.tensor([[boundary * (1 + 1e-7)], [0.01]])  # ours: just above the boundary
    ours = _rounded_sum(copies)
    official = ours - step  # the official copy rounded down: one float16 step lower
    assert compare_rounded_copies(ours, official, copies, TOL)["ok"]
    assert not compare_rounded_copies(ours, official - step, copies, TOL)["ok"]  # two steps: no


def test_a_copy_far_from_a_boundary_must_round_the_same():
    copies = torch.tensor([[0.0200], [0.0100]])
    ours = _rounded_sum(copies)
    report = compare_rounded_copies(ours, ours + 2.0 ** -16, copies, TOL)
    assert not report["ok"] and report["outside_rounding_interval"] > 0


def test_our_gradient_must_be_the_copies_sum():
    copies = torch.tensor([[0.02], [0.01]])
    assert not compare_rounded_copies(_rounded_sum(copies) + 0.01, _rounded_sum(copies), copies, TOL)["ok"]


def test_per_copy_gradients_records_each_copy_before_rounding_and_restores_the_expander():
    original = maple.expand_tokens

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prompt = torch.nn.Parameter(torch.ones(1, 2))

    holder = Holder()
    with per_copy_gradients(holder) as grads:
        copies = maple.expand_tokens(holder.prompt, 3, True)  # (3, 1, 2)
        (copies * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)).sum().backward()
    assert maple.expand_tokens is original
    assert torch.equal(grads["prompt"][0][:, 0, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(holder.prompt.grad, torch.full((1, 2), 6.0))
