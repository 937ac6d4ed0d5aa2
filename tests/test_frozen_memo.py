"""The frozen-pass memo: exact reuse of the prompt-free prefix and frozen teacher across runs on the same batches."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import Prefix, Trace
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.protocols import expand
from alignednorm.protocols.runner import SweepRequest
from alignednorm.protocols.sweep import run_sweep, same_data_groups


@pytest.fixture
def backbone():
    return ClipBackbone(make_tiny_clip(seed=3, layers=4, width=32))


def images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def teacher(backbone, x, layer=3):
    """The frozen teacher of the MMRL family: the tower's rest continued from the prompt-free prefix."""
    with torch.no_grad():
        prefix = backbone.image_prefix(x, layer)
        return prefix.states, backbone.frozen_features(Prefix(layer, prefix.states))


def test_a_repeated_batch_is_answered_from_the_memo_with_the_same_numbers(backbone):
    expected = teacher(backbone, images(0))
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(images(0)).features, expected[1])  # the whole tower's pass
    with backbone.memoize_frozen_passes(1 << 20) as memo:
        first, second = teacher(backbone, images(0)), teacher(backbone, images(0))
        assert (memo.hits, memo.misses) == (2, 2)  # prefix and continuation: computed once, then found
        other = teacher(backbone, images(1))
        assert (memo.hits, memo.misses) == (2, 4)
    assert backbone.frozen_memo is None
    for got in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(other[1], expected[1])
    assert second[0] is first[0]  # the kept copy itself, continued from


def test_a_weight_changed_in_place_invalidates_every_entry(backbone):
    with backbone.memoize_frozen_passes(1 << 20) as memo:
        teacher(backbone, images(0))
        with torch.no_grad():
            backbone.model.visual.transformer.resblocks[0].mlp.c_fc.bias.add_(0.5)
        changed = teacher(backbone, images(0))
        assert memo.hits == 0
    assert all(torch.equal(a, b) for a, b in zip(changed, teacher(backbone, images(0))))


def test_the_memo_stays_out_of_gradients_autocast_and_recorded_prefix_blocks(backbone):
    x = images(0)
    with backbone.memoize_frozen_passes(1 << 20) as memo:
        backbone.image_prefix(x, 3)  # gradients on: a learnable could act here
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            backbone.image_prefix(x, 3)
        with torch.no_grad():
            backbone.image_prefix(x, 3, Trace())  # records every block, the prefix's too
            assert (memo.hits, memo.misses) == (0, 0)
            backbone.image_prefix(x, 3)
            later_only = Trace(layers=(3, 4))  # records nothing of blocks 1-2: the memo answers
            backbone.image_prefix(x, 3, later_only)
            assert (memo.hits, memo.misses) == (1, 1)
    fresh = Trace(layers=(3, 4))
    with torch.no_grad():
        backbone.image_prefix(x, 3, fresh)
    assert (later_only.positions, later_only.prompt_start, later_only.prompt_count) == (
        fresh.positions, fresh.prompt_start, fresh.prompt_count)


def test_the_memo_keeps_at_most_its_bytes_and_forgets_the_oldest(backbone):
    with torch.no_grad():
        size = backbone.image_prefix(images(0), 3).states.nbytes
    with backbone.memoize_frozen_passes(2 * size) as memo:  # room for two prefixes
        for seed in range(4):
            with torch.no_grad():
                backbone.image_prefix(images(seed), 3)
        assert memo.nbytes <= memo.max_bytes
        with torch.no_grad():
            backbone.image_prefix(images(3), 3)
            backbone.image_prefix(images(0), 3)
        assert (memo.hits, memo.misses) == (1, 5)


TINY = ("method.rep_layers=[2,3]", "train.epochs=2", "train.batch_size=2")


def test_same_data_runs_share_the_memo_and_give_the_numbers_of_separate_runs(json_dataset, tmp_path, monkeypatch):
    clip = save_openai_state_dict(make_tiny_clip(seed=5, layers=3), tmp_path / "tiny.pt")

    def jobs(out, methods):
        return [job for method in methods for job in expand("base2new", SweepRequest(
            method, str(json_dataset.root), str(clip), str(out), datasets=("oxford_pets",), shots=(2,),
            sets=TINY if method != "zeroshot" else (), seeds=(1,), progress=False))]

    together = jobs(tmp_path / "together", ("mmrlpp", "zeroshot", "alignednorm"))
    groups = same_data_groups(together)
    assert [[j.method for j in g] for g in groups] == [["mmrlpp", "alignednorm"], ["zeroshot"]]
    memos = []
    original = ClipBackbone.memoize_frozen_passes

    @contextlib.contextmanager
    def spy(self, max_bytes):
        with original(self, max_bytes) as memo:
            memos.append(memo)
            yield memo

    monkeypatch.setattr(ClipBackbone, "memoize_frozen_passes", spy)
    assert not run_sweep(together, "inline").failed
    (memo,) = memos
    assert memo.hits >= memo.misses > 0  # alignednorm's every prefix and teacher came from mmrlpp's run
    alone = jobs(tmp_path / "alone", ("alignednorm",))
    assert not run_sweep(alone, "inline").failed and len(memos) == 1  # a group of one keeps no memo
    shared, separate = (load_file(str(Path(j.train_dir) / "learnable.safetensors")) for j in (together[2], alone[0]))
    assert shared.keys() == separate.keys() and all(torch.equal(shared[k], separate[k]) for k in shared)
    for a, b in zip(together[2].evals, alone[0].evals):
        metrics = [json.loads((Path(e.run_dir) / "metrics.json").read_text())["eval"] for e in (a, b)]
        assert metrics[0] == metrics[1]
