"""The backbone: parity with open_clip, prompt hooks, traces, frozen weights."""

import pytest
import torch

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import LayerPrompt, Prefix, Trace
from alignednorm.backbone.tiny import make_tiny_clip


def _inputs(backbone, batch=3):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=gen)
    tokens = backbone.tokenize(["a photo of a cat.", "a red circle", "x"])
    return images, tokens


@pytest.mark.parametrize("heads", [1, 2])
def test_no_prompt_matches_open_clip(heads):
    model = make_tiny_clip(seed=3, layers=2, width=128, heads=heads)
    backbone = ClipBackbone(model)
    images, tokens = _inputs(backbone)
    with torch.no_grad():
        ours_img = backbone.encode_image(images).features
        ours_txt = backbone.encode_text(tokens).features
        ref_img = model.encode_image(images)
        ref_txt = model.encode_text(tokens)
    assert torch.allclose(ours_img, ref_img, atol=1e-5)
    assert torch.allclose(ours_txt, ref_txt, atol=1e-5)


def test_blend_with_zero_weight_is_identity(tiny_backbone):
    images, _tokens = _inputs(tiny_backbone)
    n = 3
    ref = tiny_backbone.encode_image(images)

    def hook(layer):
        if layer == 2:
            return LayerPrompt(torch.randn(n, 64), mode="blend", at=None, beta=0.0)
        return None

    # Blending needs an inserted prompt first: insert at layer 1, then weight 0 at layer 2.
    prompts = torch.randn(n, 64)

    def insert_then_blend(layer):
        return LayerPrompt(prompts, mode="insert", at=1) if layer == 1 else hook(layer)

    out_a = tiny_backbone.encode_image(images, hook=insert_then_blend)
    out_b = tiny_backbone.encode_image(images, hook=lambda l: LayerPrompt(prompts, "insert", 1) if l == 1 else None)
    assert out_a.prompt_start == 1 and out_a.prompt_count == n
    assert out_a.tokens.shape[1] == ref.tokens.shape[1] + n
    assert torch.allclose(out_a.features, out_b.features, atol=1e-6)


def test_text_insertion_moves_eot_and_keeps_causality(tiny_backbone):
    _, tokens = _inputs(tiny_backbone)
    n = 4
    prompts = torch.randn(n, 64)
    out = tiny_backbone.encode_text(tokens, hook=lambda l: LayerPrompt(prompts, "insert", 1) if l == 2 else None,
                                    full_length=True)
    plain = tiny_backbone.encode_text(tokens, full_length=True)
    eot = tokens.argmax(-1)
    assert out.tokens.shape[1] == tokens.shape[1] + n
    # The pooled feature is the shifted EOT token.
    expected = out.tokens[torch.arange(3), eot + n] @ tiny_backbone.model.text_projection
    assert torch.allclose(out.features, expected)
    # Causal mask: the start token sees only itself, so inserting after it cannot change it.
    assert torch.allclose(out.hidden[:, 0], plain.hidden[:, 0], atol=1e-6)
    assert not torch.allclose(out.features, plain.features)


def test_start_from_cached_prefix(tiny_backbone):
    images, tokens = _inputs(tiny_backbone)
    trace = Trace()
    full = tiny_backbone.encode_image(images, trace=trace)
    resumed = tiny_backbone.encode_image(prefix=Prefix(2, trace.hidden[1]))
    assert torch.allclose(full.features, resumed.features, atol=1e-6)
    assert torch.equal(tiny_backbone.image_prefix(images, 2).states, trace.hidden[1])
    ttrace = Trace()
    full_t = tiny_backbone.encode_text(tokens, trace=ttrace)
    resumed_t = tiny_backbone.encode_text(tokens, prefix=tiny_backbone.text_prefix(tokens, 3))
    assert torch.allclose(full_t.features, resumed_t.features, atol=1e-6)
    # Pooling is a public step: the features are the pooled final tokens.
    assert torch.equal(tiny_backbone.pool_image(full.tokens), full.features)
    assert torch.equal(tiny_backbone.pool_text(full_t.tokens, tokens), full_t.features)


def test_trace_records_prompt_positions_in_every_mode_and_selected_layers(tiny_backbone):
    images, _ = _inputs(tiny_backbone)
    inserted, appended = torch.randn(2, 64), torch.randn(3, 64)

    def hook(layer):  # insert 2 after the class token, then MaPLe-style replace of 3 appended at the end
        if layer == 1:
            return LayerPrompt(inserted, "insert", 1)
        if layer == 2:
            return LayerPrompt(appended, "insert", -1)
        return LayerPrompt(appended, "replace", -3)

    trace = Trace(layers=(3,))
    out = tiny_backbone.encode_image(images, hook=hook, trace=trace)
    tokens = 1 + (tiny_backbone.image_size // 16) ** 2
    assert trace.positions == {1: (1, 2), 2: (tokens + 2, 3), 3: (tokens + 2, 3)}
    assert sorted(trace.hidden) == [3] and trace.hidden[3].shape[1] == tokens + 5
    assert (out.prompt_start, out.prompt_count) == (tokens + 2, 3)


def test_resnet_tower_runs_text_side_methods_and_refuses_vision_prompts():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from alignednorm.errors import ConfigError
    from alignednorm.methods import create_method

    torch.manual_seed(0)
    model = CLIP(32, CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64, head_width=16),
                 CLIPTextCfg(context_length=77, width=64, heads=1, layers=2), quick_gelu=True).eval()
    backbone = ClipBackbone(model)
    images = torch.randn(2, 3, 64, 64)
    assert not backbone.is_vit and backbone.image_size == 64
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(images).features, model.encode_image(images), atol=1e-6)
        zeroshot = create_method("zeroshot", backbone)
        zeroshot.set_classnames(["cat", "dog", "bird"])
        assert zeroshot.predict(images).shape == (2, 3)
    with pytest.raises(ConfigError, match="method 'mmrlpp' puts prompts into the image tower.*ResNet"):
        create_method("mmrlpp", backbone)
    with pytest.raises(ConfigError, match="needs a ViT"):
        backbone.encode_image(images, hook=lambda layer: None)


def test_trace_records_hidden_and_attention(tiny_backbone):
    images, _ = _inputs(tiny_backbone)
    trace = Trace(attention_layers=(2, 3), record_attn_out=True)
    out = tiny_backbone.encode_image(images, trace=trace)
    assert sorted(trace.hidden) == [1, 2, 3]
    assert torch.equal(trace.hidden[3], out.hidden)
    attn = trace.attention[3]
    assert attn.shape == (3, 1, 5, 5)
    assert torch.allclose(attn.sum(-1), torch.ones(3, 1, 5), atol=1e-5)
    assert trace.attn_out[2].shape == (3, 5, 64)


def test_clip_is_frozen_and_prompts_get_gradients(tiny_backbone):
    images, tokens = _inputs(tiny_backbone)
    prompts = torch.randn(2, 64, requires_grad=True)
    hook = lambda l: LayerPrompt(prompts, "insert", 1) if l == 1 else None
    tiny_backbone.train()
    assert not tiny_backbone.model.training
    loss = tiny_backbone.encode_image(images, hook=hook).features.sum() + tiny_backbone.encode_text(
        tokens, hook=hook
    ).features.sum()
    loss.backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.parameters())


def test_reference_tiny_clip_reproduces_frozen_features(shared_dir):
    from safetensors.torch import load_file

    fixture = shared_dir / "reference" / "mmrlpp_a"
    backbone = ClipBackbone.from_file(fixture / "clip_tiny.safetensors")
    inputs = load_file(str(fixture / "inputs.safetensors"))
    outputs = load_file(str(fixture / "outputs.safetensors"))
    with torch.no_grad():
        img = backbone.encode_image(inputs["images"]).features
        txt = backbone.encode_text(inputs["tokenized_prompts"]).features
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    assert torch.allclose(img, outputs["frozen.image_features"], atol=1e-5)
    assert torch.allclose(txt, outputs["frozen.text_features"], atol=1e-5)


def test_text_cut_after_the_last_eot_changes_no_feature_or_gradient(tiny_backbone):
    _, tokens = _inputs(tiny_backbone)
    assert tiny_backbone.text_length(tokens) == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    results = []
    for full in (True, False):
        prompts = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        hook = lambda l, p=prompts: LayerPrompt(p, "insert", 1) if l == 2 else None
        out = tiny_backbone.encode_text(tokens, hook=hook, full_length=full)
        out.features.square().sum().backward()
        prefixed = tiny_backbone.encode_text(tokens, prefix=tiny_backbone.text_prefix(tokens, 2, full_length=full),
                                             hook=hook, full_length=full)
        results.append((out.features.detach(), prompts.grad, prefixed.features.detach()))
    (full_f, full_g, full_p), (cut_f, cut_g, cut_p) = results
    assert torch.allclose(full_f, cut_f, atol=1e-6) and torch.allclose(full_g, cut_g, atol=1e-5)
    assert torch.allclose(full_p, cut_p, atol=1e-6) and torch.allclose(full_p, full_f, atol=1e-6)
