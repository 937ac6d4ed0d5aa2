"""The official-code benchmark's own parts: it refuses what is not the official checkout in one line, the
weight file it hands the official loader holds bench's random CLIP, and ``--alternate`` runs the sides in
its schedule, reads every clock and prints both of our scopes apart. Timing the official code needs its
checkouts, so it is not run here (the alternation runs on fake steps and a counting clock)."""

import math
import warnings

import pytest
import torch

from alignednorm.backbone.loading import load_clip
from alignednorm.bench import random_clip
from alignednorm.compat.bench_official import (
    OFFICIAL_FILES,
    SCOPES,
    SIDES,
    alternation_schedule,
    format_alternating,
    machine_busy_seconds,
    main,
    others_cores,
    parse_args,
    time_alternating,
    write_official_weights,
)


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_refuses_a_missing_or_wrong_official_repo(capsys, tmp_path):
    assert "--official-repo is required" in _error_line(capsys, ["--geometry", "tiny"])
    assert "no such folder" in _error_line(capsys, ["--official-repo", str(tmp_path / "absent")])
    (tmp_path / "train.py").write_text("")
    err = _error_line(capsys, ["--official-repo", str(tmp_path)])
    assert "not the official MMRL checkout" in err and "trainers/mmrlpp.py is missing" in err
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "mmrlpp.py").write_text("")
    assert "clip/clip.py is missing" in _error_line(capsys, ["--official-repo", str(tmp_path)])


def test_refuses_a_wrong_dassl_checkout(capsys, tmp_path):
    for name in OFFICIAL_FILES:  # looks like the checkout; nothing is imported before --dassl is checked
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    err = _error_line(capsys, ["--official-repo", str(tmp_path), "--dassl", str(tmp_path / "dassl")])
    assert "dassl/engine/trainer.py is missing" in err


def test_weight_file_holds_bench_random_clip(tmp_path):
    path = write_official_weights(random_clip("tiny"), tmp_path / "clip.pt")
    expected = random_clip("tiny").model.state_dict()
    loaded = load_clip(path).state_dict()  # read as OpenAI's (the size entries), QuickGELU
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    raw = torch.load(path, weights_only=True)
    assert (int(raw["input_resolution"]), int(raw["context_length"]), int(raw["vocab_size"])) == (32, 77, 49408)
    # The official load_clip_to_cpu tries torch.jit.load and falls back to torch.load on RuntimeError.
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu")


# ---------------------------------------------------------------- --alternate: the parts that need no official code
def test_alternation_schedule_gives_every_side_every_place():
    sides = list(SIDES)
    schedule = alternation_schedule(sides, 3)
    assert schedule == ["official", "ours-step", "ours-trainer", "ours-step", "ours-trainer", "official",
                        "ours-trainer", "official", "ours-step"]
    rounds = [schedule[i : i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == sorted(sides) for r in rounds)  # every side once per round
    assert {r[0] for r in rounds} == set(sides)  # each starts a round once
    assert all(sorted(r.index(side) for r in rounds) == [0, 1, 2] for side in sides)  # and every place once
    assert alternation_schedule(["a", "b"], 1) == ["a", "b"] and alternation_schedule(["a"], 2) == ["a", "a"]


def test_time_alternating_runs_the_schedule_and_reads_every_clock():
    """A fake official step and a counting clock: the seconds land on the side that ran, in order."""
    ran: list[str] = []
    ticks = {"wall": 0.0, "cpu": 0.0}
    cost = {"official": 10.0, "ours-step": 1.0, "ours-trainer": 1.5}

    def step(side):
        def run():
            ran.append(side)
            ticks["wall"] += cost[side]
            ticks["cpu"] += 2 * cost[side]
            return torch.tensor(float(len(ran)))  # a loss: read once, after the clocks

        return run

    clocks = {name: (lambda name=name: ticks[name]) for name in ticks}
    seconds, first_loss = time_alternating({side: step(side) for side in SIDES}, 2, clocks)
    assert ran == alternation_schedule(SIDES, 2)
    assert seconds["wall"] == {side: [cost[side]] * 2 for side in SIDES}
    assert seconds["cpu"] == {side: [2 * cost[side]] * 2 for side in SIDES}
    assert first_loss == {"official": 1.0, "ours-step": 2.0, "ours-trainer": 3.0}


def _report() -> dict:
    seconds = {"official": [110.0, 100.0, 120.0], "ours-step": [10.0, 12.0, 11.0], "ours-trainer": [11.0, 12.0, 13.0]}
    return {"mode": "alternate", "method": "mmrlpp", "geometry": "vit-b16", "batch": 8, "device": "cpu",
            "clocks": ["wall", "cpu", "machine"], "rounds": 3, "threads": 2, "cpus": 2, "order": list(SIDES),
            "scopes": dict(SCOPES), "peak_rss_mb": 12345.0,
            # two of our cores busy all along; others kept 1 core busy (3 x wall on the machine clock)
            "runs": [{"classes": 500, "seconds": {"wall": seconds,
                                                  "cpu": {k: [2 * x for x in v] for k, v in seconds.items()},
                                                  "machine": {k: [3 * x for x in v] for k, v in seconds.items()}},
                      "first_loss": {"official": 6.25, "ours-step": 6.25, "ours-trainer": 6.25},
                      "load_before": [1.5, 2.0, 2.5], "load_after": [3.0, 2.0, 1.0]}],
            "official": {"repo": "/x/MMRL", "dassl": None, "sha256": {"trainers/mmrlpp.py": "ab"}}}


def test_format_alternating_names_both_scopes_clocks_and_load():
    text = format_alternating(_report())
    for side in SIDES:
        assert f"  {side:<13} = {SCOPES[side]}" in text
    assert "Trainer.fit" in SCOPES["ours-trainer"] and "forward_backward" in SCOPES["official"]
    assert "bare method step" in SCOPES["ours-step"]
    wall = next(line for line in text.splitlines() if line.startswith("wall "))
    cpu = next(line for line in text.splitlines() if line.startswith("cpu "))
    # medians 110 / 11 / 12: official ÷ ours 10.00x (step), 9.17x (trainer); per round 110/10, 100/12, 120/11 ...
    assert "110.00" in wall and "10.00x (8.33-11.00)" in wall and "9.17x (8.33-10.00)" in wall and "+1.00" in wall
    assert "220.00" in cpu and "10.00x (8.33-11.00)" in cpu and "+2.00" in cpu
    assert "1.50/2.00/2.50 -> 3.00/2.00/1.00" in wall and "1.00 (1.00-1.00)" in wall
    assert "cores other processes kept busy during each step: official 1.00, 1.00, 1.00" in text
    assert "machine" not in {line.split()[0] for line in text.splitlines() if line}  # no table rows of its own
    assert "2 threads, 2 CPUs" in text and "median of 3 rounds" in text
    assert "500 classes, wall seconds of every step in the order run: official 110.00, 100.00, 120.00" in text
    assert "first loss (same start values, images, labels): official 6.250000" in text


def test_others_cores_is_the_machine_less_this_process_per_wall_second():
    seconds = {"wall": {"a": [2.0, 4.0]}, "cpu": {"a": [4.0, 4.0]}, "machine": {"a": [7.0, 3.0]}}
    assert others_cores(seconds, "a") == [1.5, 0.0]  # (7 - 4) / 2; a machine reading below ours counts as none
    assert others_cores({"wall": {"a": [1.0]}, "cpu": {"a": [1.0]}}, "a") == []
    busy = machine_busy_seconds()
    assert math.isnan(busy) or busy >= 0  # NaN without /proc/stat


def test_arguments_alternate_defaults_and_checks(capsys):
    args = parse_args(["--alternate", "--classes", "50, 500"])
    assert args.alternate and args.classes == (50, 500) and args.iters == 3 and args.threads is None
    plain = parse_args([])
    assert not plain.alternate and plain.iters == 2 and plain.classes == (50, 500) and plain.clock == "wall"
    assert parse_args(["--alternate", "--iters", "5", "--threads", "1"]).threads == 1
    assert "positive count" in _error_line(capsys, ["--alternate", "--threads", "0"])
    assert "expected comma-separated integers" in _error_line(capsys, ["--alternate", "--classes", "x"])
    assert "need positive values" in _error_line(capsys, ["--alternate", "--iters", "0"])
    # checked before anything is imported: the official checkout is still required
    assert "--official-repo is required" in _error_line(capsys, ["--alternate", "--geometry", "tiny"])
