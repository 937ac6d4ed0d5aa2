"""The paper's protocols as sweeps: base-to-new, cross-dataset, domain generalisation, few-shot.

``expand(protocol, request)`` lists the jobs of one protocol; :func:`run_job` runs one and
:mod:`alignednorm.protocols.sweep` dispatches many (in this process, as local processes, or as a
SLURM job array through submitit).
"""

from __future__ import annotations

from . import base_to_new, cross_dataset, domain_generalization, few_shot
from .runner import EvalStep, Evaluation, Job, SweepRequest, run_job

EXPANDERS = {
    base_to_new.PROTOCOL: base_to_new.expand,
    cross_dataset.PROTOCOL: cross_dataset.expand,
    domain_generalization.PROTOCOL: domain_generalization.expand,
    few_shot.PROTOCOL: few_shot.expand,
}


def list_protocols() -> list[str]:
    return list(EXPANDERS)


def expand(protocol: str, request: SweepRequest) -> list[Job]:
    """The jobs of ``protocol`` (``base2new``, ``crossdataset``, ``domaingen``, ``fewshot``) for ``request``."""
    if protocol not in EXPANDERS:
        raise KeyError(f"unknown protocol {protocol!r} (known: {', '.join(EXPANDERS)})")
    return EXPANDERS[protocol](request)


__all__ = ["EXPANDERS", "EvalStep", "Evaluation", "Job", "SweepRequest", "expand", "list_protocols", "run_job"]
