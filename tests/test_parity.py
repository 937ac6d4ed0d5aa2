"""Parity with the official MMRL++ and AlignedNorm code on every fixture in shared/reference."""

import json
import subprocess
import sys

import pytest
from conftest import SHARED

from alignednorm.compat.parity import run_parity

FIXTURES = sorted(p.parent for p in (SHARED / "reference").glob("*/manifest.json")) if SHARED.is_dir() else []


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_fixture_parity(fixture):
    report = run_parity(fixture)
    assert report["failed"] == []
    assert report["ok"]
    # Every tensor the fixture holds was compared.
    with open(fixture / "manifest.json") as handle:
        manifest = json.load(handle)
    assert report["num_compared"] >= len(manifest["tensors"]["outputs.safetensors"])


def test_parity_command_exit_status(shared_dir):
    fixture = shared_dir / "reference" / "alignednorm_a"
    proc = subprocess.run([sys.executable, "-m", "alignednorm.compat.parity", str(fixture)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["method"] == "alignednorm"
    assert report["tensors"]["loss.l_token"]["max_abs_diff"] < 5e-5


def test_fixture_list_is_not_empty(shared_dir):
    assert {f.name for f in FIXTURES} >= {"mmrlpp_a", "alignednorm_a"}
