"""MaPLe and the deep prompt parts: couplings, positions, float16 rounding, init, official names."""

import logging

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import PromptState, Trace, Traces, splice
from alignednorm.compat.official import convert_official_state
from alignednorm.errors import ConfigError
from alignednorm.methods import create_method
from alignednorm.prompts.deep import appended_vision_hook, expand_tokens, text_context_hook


@pytest.fixture(scope="module")
def wide_backbone():
    """Vision width 128 (2 heads) and text width 64: couplings map 64 -> 128, as maple_a."""
    torch.manual_seed(0)
    model = CLIP(48, CLIPVisionCfg(layers=4, width=128, patch_size=16, image_size=32, head_width=64),
                 CLIPTextCfg(context_length=77, width=64, heads=1, layers=4), quick_gelu=True)
    return ClipBackbone(model.eval())


def test_couplings_map_each_blocks_text_prompts_to_vision(wide_backbone):
    method = create_method("maple", wide_backbone, {"n_ctx": 3, "prompt_depth": 3, "ctx_init": ""})
    assert sorted(method.text_prompts.keys()) == ["1", "2", "3"]
    assert method.text_prompts["2"].shape == (3, 64) and method.couplings["2"].weight.shape == (128, 64)
    vision = method.vision_prompts()
    for block in (1, 2, 3):
        expected = method.text_prompts[str(block)] @ method.couplings[str(block)].weight.t()
        assert torch.allclose(vision[block], expected + method.couplings[str(block)].bias, atol=1e-6)
    # The deep couplings start as copies of one Linear (official _get_clones); block 1's is its own.
    assert torch.equal(method.couplings["2"].weight, method.couplings["3"].weight)
    assert not torch.equal(method.couplings["1"].weight, method.couplings["2"].weight)


def test_vision_prompts_are_appended_then_replaced():
    x = torch.zeros(2, 3, 4)
    first, deep = torch.ones(2, 2, 4), {2: 2 * torch.ones(2, 2, 4)}
    hook, state = appended_vision_hook(first, deep), PromptState()
    x = splice(x, hook(1), state)
    assert x.shape == (2, 5, 4) and (state.start, state.n) == (3, 2)
    assert x[:, :3].eq(0).all() and x[:, 3:].eq(1).all()
    x = splice(x + 5, hook(2), state)  # block 1's outputs at the prompt positions are dropped
    assert x[:, :3].eq(5).all() and x[:, 3:].eq(2).all() and hook(3) is None


def test_text_prompts_replace_positions_one_to_n():
    x = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    hook, state = text_context_hook({2: -torch.ones(2, 2, 1)}), PromptState()
    assert hook(1) is None
    y = splice(x, hook(2), state)
    assert y[:, 1:3].eq(-1).all() and torch.equal(y[:, :1], x[:, :1]) and torch.equal(y[:, 3:], x[:, 3:])
    assert state.n == 0  # nothing inserted: the EOT does not move


def test_fp16_rounding_of_values_and_of_each_copys_gradient():
    tokens = torch.tensor([[1.0 + 2**-12]], requires_grad=True)
    copies = expand_tokens(tokens, 2, fp16_rounding=True)
    assert copies[0, 0, 0].item() == 1.0  # 1 + 2^-12 is not a float16 number
    (copies[:, 0, 0] * torch.tensor([1.0 + 2**-12, 1.0])).sum().backward()
    assert tokens.grad.item() == 2.0  # each copy's gradient rounded, then summed
    plain = tokens.detach().clone().requires_grad_(True)
    (expand_tokens(plain, 2)[:, 0, 0] * torch.tensor([1.0 + 2**-12, 1.0])).sum().backward()
    assert plain.grad.item() == 2.0 + 2**-12


def test_prompts_sit_where_the_official_code_puts_them(wide_backbone):
    method = create_method("maple", wide_backbone, {"n_ctx": 2, "prompt_depth": 3})
    method.set_classnames(["red circle", "blue_square"])
    images = torch.randn(3, 3, 32, 32)
    vtrace, ttrace = Trace(), Trace()
    method(images, trace=Traces(image=vtrace, text=ttrace))
    assert vtrace.hidden[1].shape == (3, 1 + 4 + 2, 128) and vtrace.prompt_start == 5
    assert ttrace.hidden[1].shape[0] == 2  # prompts sit inside the text: the sequence is not lengthened
    assert ttrace.hidden[1].shape[1] == method.backbone.text_length(method.token_ids)
    # Changing block 3's prompts changes nothing before block 3.
    before = {k: v.clone() for k, v in vtrace.hidden.items()}
    with torch.no_grad():
        method.text_prompts["3"].add_(1.0)
    vtrace = Trace()
    method(images, trace=Traces(image=vtrace))
    assert torch.equal(vtrace.hidden[2], before[2]) and not torch.equal(vtrace.hidden[3], before[3])


def test_context_from_words_and_prompt_text(wide_backbone):
    method = create_method("maple", wide_backbone, {"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 4})
    ids = wide_backbone.tokenize(["a photo of a"])
    words = wide_backbone.model.token_embedding(ids)[0, 1:3]
    assert torch.equal(method.text_prompts["1"].detach(), words)
    method.set_classnames(["sea_lion"])
    assert torch.equal(method.token_ids, wide_backbone.tokenize(["a photo of a sea lion."]))
    with pytest.raises(ConfigError, match="ctx_init = 'a photo' has 2 tokens, fewer than n_ctx = 3"):
        create_method("maple", wide_backbone, {"n_ctx": 3, "ctx_init": "a photo", "prompt_depth": 4})
    with pytest.raises(ConfigError, match="prompt_depth = 0 is out of range"):
        create_method("maple", wide_backbone, {"prompt_depth": 0})


def test_depth_past_the_backbone_keeps_official_sets_and_warns(wide_backbone, caplog):
    with pytest.raises(ConfigError, match="MaPLe.Config.prompt_depth = 6: the backbone has 4 blocks"):
        create_method("maple", wide_backbone, {"prompt_depth": 6})
    with caplog.at_level(logging.WARNING):  # as the official code, on request (parity fixtures)
        method = create_method("maple", wide_backbone, {"prompt_depth": 6, "unused_prompt_blocks": True})
    assert "blocks 5..6 are never used" in caplog.text
    assert len(method.text_prompts) == 6 and len(method.couplings) == 6


def test_official_names_round_trip(wide_backbone):
    method = create_method("maple", wide_backbone, {"prompt_depth": 3})
    official = {"prompt_learner.ctx": torch.zeros(2, 64), "prompt_learner.proj.weight": torch.zeros(128, 64),
                "prompt_learner.proj.bias": torch.zeros(128), "prompt_learner.token_prefix": torch.zeros(1),
                "text_encoder.positional_embedding": torch.zeros(1)}
    for i in range(2):
        official[f"prompt_learner.compound_prompts_text.{i}"] = torch.full((2, 64), float(i))
        official[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.zeros(128, 64)
        official[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.zeros(128)
    state = convert_official_state(official, "maple")
    assert sorted(state) == sorted(method.learnable_state_dict())
    method.load_learnable_state_dict(state)
    assert method.text_prompts["3"].eq(1.0).all()  # compound_prompts_text.1 is block 3's
