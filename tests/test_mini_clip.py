"""The tiny CLIP: architecture and key names, the prefix text encoder, and the shipped checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignednorm.mini import MINI_DATASETS, mini_clip_path
from alignednorm.mini.model import MINI_CLIP, build_mini_clip, encode_text, evaluate_zero_shot, tokenize
from alignednorm.mini.pretrain import CAPTIONS

OPENAI_KEYS = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
               "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.11.mlp.c_proj.bias",
               "visual.ln_post.bias", "visual.proj", "token_embedding.weight", "positional_embedding",
               "transformer.resblocks.11.attn.out_proj.weight", "ln_final.weight", "text_projection", "logit_scale"}
CHECKPOINT = mini_clip_path()
needs_checkpoint = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"{CHECKPOINT} not built yet")


@pytest.fixture(scope="module")
def small_clip():
    torch.manual_seed(0)
    return build_mini_clip(vision_layers=2, text_layers=2).eval()


def test_architecture_has_openai_keys():
    state = build_mini_clip().state_dict()
    assert OPENAI_KEYS <= set(state)
    assert not any("attn_mask" in k for k in state)
    for tower in ("visual.transformer", "transformer"):
        prefix = f"{tower}.resblocks."
        assert {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)} == set(range(12))
    assert state["token_embedding.weight"].shape == (MINI_CLIP["vocab_size"], MINI_CLIP["text_width"])
    assert state["positional_embedding"].shape[0] == MINI_CLIP["context_length"]


def test_prefix_text_encoder_matches_open_clip(small_clip):
    tokens = tokenize(["a photo of a spotted fish.", "{}", "a scene with a circle left of a square."])
    with torch.no_grad():
        ours, reference = encode_text(small_clip, tokens), small_clip.encode_text(tokens)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_every_caption_fits_the_context():
    longest = max(len(tokenize(t.format(c))[0].nonzero()) for d in MINI_DATASETS for c in d.classnames
                  for t in (d.template, *CAPTIONS))
    assert longest <= MINI_CLIP["context_length"]
    with pytest.raises(ValueError, match="context length"):
        tokenize("word " * 40)


@needs_checkpoint
def test_checkpoint_format_and_metadata():
    assert CHECKPOINT.stat().st_size <= 16 * 2**20
    state = load_file(CHECKPOINT)
    assert set(state) == set(build_mini_clip().state_dict())
    assert all(v.dtype == torch.float16 for v in state.values())
    meta = json.loads(CHECKPOINT.with_suffix(".json").read_text(encoding="utf-8"))
    single, chance = meta["zero_shot"]["single"], meta["zero_shot"]["chance"]
    assert set(single) == {d.name for d in MINI_DATASETS}
    assert all(single[n] >= 3 * chance[n] for n in single), single
    assert meta["zero_shot_mean_single"] >= 0.5
    assert {"seed", "steps"} <= set(meta["config"]) and meta["command"].startswith("python -m alignednorm.mini")


@needs_checkpoint
def test_zero_shot_on_a_fixed_subset():
    names = ["mini_objects", "mini_counts", "mini_relations"]
    accs = evaluate_zero_shot(CHECKPOINT, names=names, per_class=10)
    chance = {d.name: 1 / len(d.classes) for d in MINI_DATASETS}
    assert all(accs[n] >= 3 * chance[n] for n in names), accs


def test_zero_shot_reads_disk_like_memory(tmp_path, small_clip):
    from safetensors.torch import save_file

    from alignednorm.mini import generate_world

    path = tmp_path / "clip.safetensors"
    save_file({k: v.half().contiguous() for k, v in small_clip.state_dict().items()}, path)
    generate_world(tmp_path, names=["mini_counts"])
    on_disk = evaluate_zero_shot(path, tmp_path, names=["mini_counts"], per_class=3)
    in_memory = evaluate_zero_shot(path, None, names=["mini_counts"], per_class=3)
    assert on_disk == in_memory and 0 <= on_disk["mini_counts"] <= 1
