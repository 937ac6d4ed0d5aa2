"""Domain generalisation (paper Table 3).

The cross-dataset model (same training run: source, all classes, 16 shots) evaluated on shifted
versions of the source: ImageNet-V2, -Sketch, -A and -R in the paper (A and R on their 200-class
subsets, as their readers provide). A model already trained for cross-dataset is reused.
"""

from __future__ import annotations

from .cross_dataset import transfer_jobs
from .runner import Job, SweepRequest

PROTOCOL = "domaingen"


def expand(request: SweepRequest) -> list[Job]:
    """Train on the suite's source (or reuse that run); targets default to its DG list."""
    suite = request.get_suite()
    return transfer_jobs(request, PROTOCOL, suite.source, tuple(request.datasets or suite.dg_targets))
