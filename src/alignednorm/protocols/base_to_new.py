"""Base-to-new generalisation (paper Table 1).

Per dataset and seed: train K-shot (16) on the base half of the classes, then evaluate the saved
prompt on the base classes (rule ``seen``: MMRL++'s fused logits) and on the new classes (rule
``unseen``: its class branch); unified methods use one rule for both. The report
gives base, new and their harmonic mean, computed from the seed-averaged accuracies.
"""

from __future__ import annotations

from .runner import Evaluation, Job, SweepRequest, per_dataset_jobs

PROTOCOL = "base2new"
DEFAULT_SHOTS = (16,)
EVALUATIONS = (Evaluation("base", classes="base", rule="seen"), Evaluation("new", classes="new", rule="unseen"))


def expand(request: SweepRequest) -> list[Job]:
    """One job per (dataset, shots, seed); datasets default to the suite's base-to-new list."""
    return per_dataset_jobs(request, PROTOCOL, DEFAULT_SHOTS, EVALUATIONS, "base")
