"""CoOp: the text context's prompt layout, init, class-specific contexts, official names, training terms."""

import pytest
import torch
from safetensors.torch import save_file

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.compat.official import import_official
from alignednorm.errors import CheckpointError, ConfigError
from alignednorm.methods import create_method, get_method_class, make_config
from alignednorm.prompts.text_context import TextContext, layout_index

CLASSES = ["red circle", "blue_square", "green triangle"]


def _distinct_context(context: TextContext) -> torch.Tensor:
    """Context vectors that are easy to recognise: v_j = (j + 1) · 10 in every coordinate."""
    values = torch.arange(1, context.n_ctx + 1, dtype=torch.float32)[:, None] * 10
    with torch.no_grad():
        context.ctx.copy_(values.expand(-1, context.width))
    return context.ctx.detach()


def test_layout_index_by_hand():
    # L = 4 context slots, class names of 2 and 1 tokens, sequences of 10 positions.
    end = layout_index([2, 1], 4, 10, "end")
    assert end.tolist() == [list(range(10))] * 2
    front = layout_index([2, 1], 4, 10, "front")
    assert front[0].tolist() == [0, 5, 6, 1, 2, 3, 4, 7, 8, 9]
    assert front[1].tolist() == [0, 5, 1, 2, 3, 4, 6, 7, 8, 9]
    middle = layout_index([2, 1], 4, 10, "middle")
    assert middle[0].tolist() == [0, 1, 2, 5, 6, 3, 4, 7, 8, 9]
    assert middle[1].tolist() == [0, 1, 2, 5, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_token_positions(tiny_backbone, position):
    context = TextContext(tiny_backbone, n_ctx=4, position=position)
    context.set_classnames(tiny_backbone, CLASSES)
    ctx = _distinct_context(context)
    x = context.embeddings()  # (C, T, W)
    table = tiny_backbone.model.token_embedding
    # "X X X X red circle." tokenises to [SOS, X×4, red, circle, ., EOS, pad...]
    ids = tiny_backbone.tokenize(["X X X X red circle."])[0]
    assert torch.equal(context.token_ids[0], ids)
    name = table(ids[5:7])  # the two class tokens
    rest = table(ids[7:])  # '.', EOS, padding
    sos = table(ids[:1])
    half = 2
    expected = {
        "end": [sos, ctx, name, rest],
        "front": [sos, name, ctx, rest],
        "middle": [sos, ctx[:half], name, ctx[half:], rest],
    }[position]
    assert torch.equal(x[0], torch.cat(expected))
    assert x.shape == (3, 77, tiny_backbone.text_width)


def test_random_init_and_placeholder_prompt(tiny_backbone):
    torch.manual_seed(0)
    context = TextContext(tiny_backbone, n_ctx=16)
    assert context.prompt_prefix == " ".join(["X"] * 16)
    assert context.ctx.shape == (16, tiny_backbone.text_width)
    ctx = context.ctx.detach()
    assert 0.015 < float(ctx.std()) < 0.025 and abs(float(ctx.mean())) < 0.005


def test_word_init_equals_frozen_clip_at_start(tiny_backbone):
    """Initialised from "a photo of a", CoOp's text features are frozen CLIP's for "a photo of a {class}."."""
    method = create_method("coop", tiny_backbone, {"ctx_init": "a photo of a", "n_ctx": 16})
    assert method.context.n_ctx == 4 and method.context.prompt_prefix == "a photo of a"
    method.set_classnames(CLASSES)
    method.eval()
    prompts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    with torch.no_grad():
        frozen = tiny_backbone.encode_text(tiny_backbone.tokenize(prompts)).features
        ours = method.compute_text_features()
    assert torch.allclose(ours, frozen, atol=1e-5)


def test_forward_is_cosine_logits_with_clip_scale(tiny_backbone):
    method = create_method("coop", tiny_backbone, {"n_ctx": 4})
    method.set_classnames(CLASSES)
    method.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = method(images)
        image = tiny_backbone.encode_image(images).features
        text = method.compute_text_features()
    expected = tiny_backbone.model.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ \
        torch.nn.functional.normalize(text, dim=-1).t()
    assert torch.allclose(out.logits, expected, atol=1e-4)


def test_class_specific_context(tiny_backbone):
    assert get_method_class("coop").traits.class_specific is False
    method = create_method("coop", tiny_backbone, {"n_ctx": 4, "class_specific": True})
    assert method.traits.class_specific is True
    method.set_classnames(CLASSES)
    assert method.context.ctx.shape == (3, 4, tiny_backbone.text_width)
    with pytest.raises(CheckpointError, match="holds 3 classes; 2 were given"):
        method.set_classnames(["cat", "dog"])
    # Each class uses its own context: changing class 1's leaves class 0's text feature alone.
    method.eval()
    with torch.no_grad():
        before = method.compute_text_features()
        method.context.ctx[1].add_(0.5)
        after = method.compute_text_features()
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])
    # A trained class-specific prompt refuses other class lists, and reloads before any label space.
    method.set_trained_classnames(CLASSES, "memory")
    with pytest.raises(CheckpointError, match="one prompt per class"):
        method.check_classnames(["red circle", "green triangle", "blue_square"], "unseen")
    other = create_method("coop", tiny_backbone, {"n_ctx": 4, "class_specific": True})
    other.load_learnable_state_dict(method.learnable_state_dict())
    other.set_classnames(CLASSES)
    other.eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(other.predict(images), method.predict(images), atol=1e-6)


def test_training_step_terms_and_gradient(tiny_backbone):
    method = create_method("coop", tiny_backbone, {"n_ctx": 4})
    method.set_classnames(CLASSES)
    method.train()
    terms = method.training_step((torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])))
    assert {"loss", "ce", "acc", "ctx_norm_0", "ctx_norm_3"} <= set(terms)
    assert torch.allclose(terms["ctx_norm_2"], method.context.ctx[2].norm())
    terms["loss"].backward()
    assert method.context.ctx.grad is not None and method.context.ctx.grad.abs().sum() > 0


def test_official_checkpoint_names(tiny_backbone, tmp_path):
    method = create_method("coop", tiny_backbone, {"n_ctx": 4})
    values = torch.randn(4, tiny_backbone.text_width)
    # Dassl saves the prompt learner alone: ctx plus the class-dependent buffers (ignored).
    for name in ("ctx", "prompt_learner.ctx"):
        path = tmp_path / f"{name}.safetensors"
        save_file({name: values, "token_prefix": torch.zeros(3, 1, 8), "token_suffix": torch.zeros(3, 60, 8)},
                  str(path))
        import_official(method, path)
        assert torch.equal(method.context.ctx.detach(), values)
    save_file({"ctx": torch.randn(5, tiny_backbone.text_width)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        import_official(method, tmp_path / "bad.safetensors")


def test_config_errors():
    with pytest.raises(ConfigError, match="class_token_position = 'top'"):
        make_config("coop", {"class_token_position": "top"})
    with pytest.raises(ConfigError, match="n_ctx = 0 is out of range"):
        make_config("coop", {"n_ctx": 0})


def test_resnet_backbone():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(32, CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64, head_width=16),
                 CLIPTextCfg(context_length=77, width=64, heads=1, layers=2), quick_gelu=True).eval()
    method = create_method("coop", ClipBackbone(model), {"n_ctx": 4})
    method.set_classnames(CLASSES)
    terms = method.training_step((torch.randn(2, 3, 64, 64), torch.tensor([0, 2])))
    terms["loss"].backward()
    assert method.context.ctx.grad.abs().sum() > 0
