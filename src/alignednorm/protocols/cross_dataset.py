"""Cross-dataset transfer (paper Table 2), and the machinery domain generalisation shares.

Per seed, one training run on the suite's source dataset (ImageNet in the paper) with all classes
and 16 shots, using the preset's ``crossdataset`` section. Its prompt is then evaluated, without
re-training, on the source (all classes, rule ``seen``: the official code uses the fused logits on
ImageNet itself) and on every target (all classes, rule ``unseen``: MMRL++'s class branch, fused
logits for unified methods). Each target is evaluated with the test-time method settings of the
preset's ``targets`` map (MMRL++'s official per-target ``prc_beta``) when it has one.
"""

from __future__ import annotations

from alignednorm.errors import ConfigError

from .runner import EvalStep, Evaluation, Job, SweepRequest, canonical_datasets, target_overrides

PROTOCOL = "crossdataset"
TRAIN_PROTOCOL = "crossdataset"  # domain generalisation evaluates this same training run
DEFAULT_SHOTS = (16,)
SOURCE_EVALUATIONS = (Evaluation("all", classes="all", rule="seen"),)
TARGET_EVALUATIONS = (Evaluation("all", classes="all", rule="unseen"),)


def transfer_jobs(request: SweepRequest, protocol: str, source: str, targets: tuple[str, ...]) -> list[Job]:
    """One job per (shots, seed): train on ``source``, evaluate ``source`` and each target."""
    source, targets = canonical_datasets([source])[0], canonical_datasets(targets)
    if source in targets:
        raise ConfigError(f"{source!r} is the source of the {protocol} protocol; it cannot also be a target")
    overrides = target_overrides(request.method, protocol)
    jobs = []
    for shots in request.shots or DEFAULT_SHOTS:
        for seed in request.seeds:
            eval_root = request.run_dir(TRAIN_PROTOCOL, source, shots, seed) / "eval"
            steps = [EvalStep(source, str(eval_root / source), SOURCE_EVALUATIONS, overrides.get(source, {}), protocol)]
            steps += [EvalStep(t, str(eval_root / t), TARGET_EVALUATIONS, overrides.get(t, {}), protocol)
                      for t in targets]
            jobs.append(request.job(protocol, source, shots, seed, "all", steps, config_protocol=TRAIN_PROTOCOL))
    return jobs


def expand(request: SweepRequest) -> list[Job]:
    """Train on the suite's source; targets default to its cross-dataset list."""
    suite = request.get_suite()
    return transfer_jobs(request, PROTOCOL, suite.source, tuple(request.datasets or suite.cross_targets))
