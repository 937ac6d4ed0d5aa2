"""Few-shot learning (paper Tables 4 and 11).

Per dataset, K and seed: train on K shots of every class, then evaluate on the full test set with
the ``seen`` rule: every test class was trained on, and the official few-shot test uses the fused
logits (MMRL++'s ``logits_fusion``). Epochs follow each method's official runs per K: a preset's
``protocols.fewshot.shots.<K>`` section (CoOp and Nemesis: 50 / 100 / 100 / 200 / 200 for K = 1, 2,
4, 8, 16, ImageNet 50); the other methods' official few-shot scripts use one config for every K.
"""

from __future__ import annotations

from .runner import Evaluation, Job, SweepRequest, per_dataset_jobs

PROTOCOL = "fewshot"
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
EVALUATIONS = (Evaluation("all", classes="all", rule="seen"),)


def expand(request: SweepRequest) -> list[Job]:
    """One job per (dataset, K, seed); datasets default to the suite's base-to-new list."""
    return per_dataset_jobs(request, PROTOCOL, DEFAULT_SHOTS, EVALUATIONS, "all")
