"""The paper's protocols as sweeps: base-to-new, cross-dataset, domain generalisation, few-shot.

``expand(protocol, request)`` lists the jobs of one protocol; :func:`run_job` runs one and
:mod:`alignednorm.protocols.sweep` dispatches many (in this process, as local processes, or as a
SLURM job array through submitit). The runner (and with it torch) is imported on first use, so the
command line's ``--help`` and usage errors stay instant.
"""

from __future__ import annotations

import importlib

# Protocol name -> the module that expands it (each module's ``PROTOCOL`` is its key).
MODULES = {"base2new": "base_to_new", "crossdataset": "cross_dataset", "domaingen": "domain_generalization",
           "fewshot": "few_shot"}
_RUNNER_NAMES = ("EvalStep", "Evaluation", "Job", "SweepRequest", "run_job")


def list_protocols() -> list[str]:
    return list(MODULES)


def expand(protocol: str, request):
    """The jobs of ``protocol`` (``base2new``, ``crossdataset``, ``domaingen``, ``fewshot``) for ``request``."""
    if protocol not in MODULES:
        raise KeyError(f"unknown protocol {protocol!r} (known: {', '.join(MODULES)})")
    return importlib.import_module(f"{__name__}.{MODULES[protocol]}").expand(request)


def __getattr__(name: str):
    if name in _RUNNER_NAMES:
        return getattr(importlib.import_module(f"{__name__}.runner"), name)
    if name == "EXPANDERS":
        return {p: importlib.import_module(f"{__name__}.{m}").expand for p, m in MODULES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EXPANDERS", "EvalStep", "Evaluation", "Job", "SweepRequest", "expand", "list_protocols", "run_job"]
