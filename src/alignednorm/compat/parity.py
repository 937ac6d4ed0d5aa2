"""Numerical parity with official code on a golden-tensor fixture, for every method that has fixtures.

Usage: ``python -m alignednorm.compat.parity FIXTURE_DIR [--threads N]``

A fixture folder (format: ``shared/reference/README.md``) holds a tiny CLIP, the official
learnable values, an input batch and every tensor the official code computed; every setting is
read from its ``manifest.json``. The manifest's official config section names the method, and
this module hands the fixture to that method's parity module (:data:`SECTIONS`):
``parity_mmrl`` (MMRL, MMRL++, AlignedNorm), ``parity_deep`` (MaPLe, PromptSRC),
``parity_coop`` (CoOp, CoCoOp), ``parity_nemesis`` (Nemesis), ``parity_hicropl`` (HiCroPL), ``parity_plot``
(PLOT, PLOT + Nemesis); a run-level
fixture (manifest ``kind``: a whole official training run) goes to ``parity_run``. Prints one JSON report; the exit
status is 0 iff every tensor is within tolerance. The comparison rules and the report format below are
shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import sys
from pathlib import Path

import torch

from alignednorm.errors import AlignedNormError

# Official config section -> the module (in this package) that reproduces that method's fixtures.
SECTIONS = {
    "TRAINER.MMRLpp": "parity_mmrl",
    "TRAINER.MMRL": "parity_mmrl",
    "TRAINER.ALIGNEDNORM": "parity_mmrl",
    "TRAINER.MAPLE": "parity_deep",
    "TRAINER.PROMPTSRC": "parity_deep",
    "TRAINER.CoOpNemesis": "parity_nemesis",
    "TRAINER.CoOp": "parity_coop",
    "TRAINER.COOP": "parity_coop",
    "TRAINER.COCOOP": "parity_coop",
    "TRAINER.HICROPL": "parity_hicropl",
    "TRAINER.PLOT": "parity_plot",
    "TRAINER.PLOTNemesis": "parity_plot",
}
# A manifest ``kind`` starting so is a whole official training run (compared by ``parity_run``).
RUN_LEVEL_KIND = "run-level golden fixture"
DEFAULT_TOLERANCES = {"hidden": 1e-5, "logits": 1e-4, "losses": 5e-5, "gradients_rel": 1e-4,
                      "gradients_zero_atol": 1e-6, "after_step": 2e-5, "accuracy": 1e-3}


def parity_module(manifest: dict):
    """The parity module for a fixture: ``parity_run`` for a whole official run (by the manifest's ``kind``),
    else the method's, found by the manifest's official config section."""
    if str(manifest.get("kind", "")).startswith(RUN_LEVEL_KIND):
        return importlib.import_module("alignednorm.compat.parity_run")
    for section, module in SECTIONS.items():
        if section in manifest.get("config", {}):
            if module == "parity_coop" and "class_names_base" not in manifest:
                module = "parity_nemesis"  # a plain CoOp section in the Nemesis fixtures' format (one class list)
            return importlib.import_module(f"alignednorm.compat.{module}")
    raise ValueError(f"manifest config has none of the sections {sorted(SECTIONS)}")


def method_from_manifest(manifest: dict) -> tuple:
    """Our method name and config for a fixture (``(name, config, ...)``, as its parity module returns)."""
    return parity_module(manifest).method_from_manifest(manifest)


def compute_outputs(fixture: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Every tensor a fixture holds, computed by our implementation from the fixture's inputs."""
    return parity_module(manifest).compute_outputs(Path(fixture), manifest)


def tolerances(manifest: dict) -> dict:
    tol = dict(DEFAULT_TOLERANCES)
    given = manifest.get("tolerances", {})
    for ours, key in (("hidden", "hidden_states_features_rep_tokens_atol"), ("hidden", "hidden_states_features_atol"),
                      ("logits", "logits_atol"), ("losses", "losses_atol"), ("after_step", "after_step_atol")):
        if isinstance(given.get(key), (int, float)):
            tol[ours] = float(given[key])
    return tol


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: dict) -> dict:
    """Max |ours − ref| against the tolerance of ``name``'s group (float64 references compared in float64)."""
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    ours = ours.detach().to(dtype)
    ours = ours.reshape(ref.shape) if ours.numel() == ref.numel() else ours
    if ours.shape != ref.shape:
        return {"ok": False, "error": f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"}
    diff = float((ours - ref.to(dtype)).abs().max()) if ref.numel() else 0.0
    if name.startswith(("grad.", "step.")):
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        limit = tol["gradients_rel"] * scale if scale > 0 else tol["gradients_zero_atol"]
    elif name.startswith("after_step."):
        limit = tol["after_step"]
    elif name.startswith("loss."):
        limit = tol["losses"]
    elif name == "train.acc":
        limit = tol["accuracy"]
    elif ".logits" in name or name.endswith(".output"):
        limit = tol["logits"]
    else:
        limit = tol["hidden"]
    return {"max_abs_diff": diff, "tolerance": limit, "ok": diff <= limit}


def read_manifest(fixture_dir: str | Path) -> tuple[Path, dict]:
    """A fixture folder and its ``manifest.json``."""
    fixture = Path(fixture_dir)
    return fixture, json.loads((fixture / "manifest.json").read_text())


@contextlib.contextmanager
def fixture_threads(manifest: dict, threads: int | None = None):
    """Run with the torch threads the fixture was produced with (float sums depend on them), restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or manifest.get("produced_by", {}).get("torch_num_threads", 2))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def official_name_map(method: str, official_names: list[str]) -> dict[str, str]:
    """Our parameter name -> official name, through the importer (so names that need all others, e.g.
    HiCroPL's visual proxies numbered by layer, come out as the importer gives them)."""
    from alignednorm.compat.official import convert_official_state

    index = convert_official_state({n: torch.tensor(i) for i, n in enumerate(official_names)}, method)
    return {ours: official_names[int(i)] for ours, i in index.items()}


@dataclasses.dataclass
class FixtureStart:
    """A method built on a fixture's tiny CLIP with what the official code started from.

    Attributes:
        method: our method (its backbone runs all 77 text positions, as the official text towers do).
        start: the official start values under our names; ``source`` the file they come from.
        names: our parameter name -> official name.
        inputs: the fixture's input batch (``images``, ``labels``, token ids).
    """

    method: object
    start: dict[str, torch.Tensor]
    names: dict[str, str]
    inputs: dict[str, torch.Tensor]
    source: str


def fixture_start(fixture: Path, name: str, config: dict) -> FixtureStart:
    """Build ``name`` with ``config`` on ``fixture``'s CLIP and read its official start values and inputs."""
    from safetensors.torch import load_file

    from alignednorm.backbone.clip import ClipBackbone
    from alignednorm.compat.official import convert_official_state
    from alignednorm.methods import create_method

    backbone = ClipBackbone.from_file(fixture / "clip_tiny.safetensors", cut_text_padding=False)
    source = str(fixture / "learnable.safetensors")
    official = load_file(source)
    return FixtureStart(create_method(name, backbone, config), convert_official_state(official, name),
                        official_name_map(name, list(official)), load_file(str(fixture / "inputs.safetensors")), source)


def manifest_sgd(params, step: dict) -> torch.optim.SGD:
    """Dassl's SGD with a fixture's ``optimizer_step`` settings, at the rate of step 1."""
    return torch.optim.SGD(params, lr=step["lr_at_step1"], momentum=step["momentum"],
                           weight_decay=step["weight_decay"], dampening=step["dampening"], nesterov=step["nesterov"])


def build_report(fixture: Path, name: str, config: dict, results: dict[str, dict]) -> dict:
    """The JSON report: overall ``ok``, failures, the largest difference per tensor group, every tensor."""
    worst: dict[str, float] = {}
    for key, res in results.items():
        group = key.split(".")[0]
        worst[group] = max(worst.get(group, 0.0), res.get("max_abs_diff", float("inf")))
    return {"fixture": str(fixture), "method": name, "config": config, "ok": all(r["ok"] for r in results.values()),
            "num_compared": len(results), "failed": sorted(k for k, r in results.items() if not r["ok"]),
            "max_abs_diff_by_group": worst, "tensors": results}


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Compare our implementation with a fixture; returns the report (``report["ok"]``)."""
    fixture, manifest = read_manifest(fixture_dir)
    return parity_module(manifest).run_parity(fixture, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the fixture's)")
    args = parser.parse_args(argv)
    try:
        report = run_parity(args.fixture_dir, args.threads)
    except (AlignedNormError, OSError, ValueError) as exc:  # a bad fixture: one line naming the file or key
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
