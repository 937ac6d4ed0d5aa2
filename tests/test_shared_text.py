"""The exact speed paths: the prompts' common beginning computed once, attention through SDPA."""

import contextlib

import pytest
import torch

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import LayerPrompt, Prefix, Trace
from alignednorm.backbone.shared_text import leading_shared_length, shareable
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.methods import create_method

CLASSES = ["cat", "red circle", "a very long class name of many words", "x", "dog"]


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    return ClipBackbone(make_tiny_clip(seed=5, layers=12, width=64, heads=2))


@contextlib.contextmanager
def sharing(backbone: ClipBackbone, on: bool):
    before = backbone.share_text_prefix
    backbone.share_text_prefix = on
    try:
        yield
    finally:
        backbone.share_text_prefix = before


def test_leading_shared_length_by_hand():
    x = torch.zeros(3, 5, 2)
    x[1, 3] = 1.0  # rows differ from position 3 on
    x[2, 4] = 1.0
    assert leading_shared_length(x) == 3
    assert shareable(x) == 3
    assert shareable(x[:1]) == 0  # one row: nothing to share
    assert shareable(torch.zeros(2, 4, 2)) == 3  # identical rows: the last position stays per row
    assert shareable(x.clone().requires_grad_()) == 0  # rows equal by value only: gradients would be wrong


def _encode(backbone, tokens, hook, prefix_layer=None):
    prompts = hook.prompts
    prefix = None if prefix_layer is None else Prefix(prefix_layer, backbone.text_prefix(tokens, prefix_layer).states)
    out = backbone.encode_text(tokens, hook=hook, prefix=prefix)
    out.features.square().sum().backward()
    return out.features.detach(), out.tokens.detach(), [p.grad.clone() for p in prompts]


class InsertThenBlend:
    """MMRL++'s text schedule: insert at layer 2, blend at 3 and 4; optionally a per-row prompt at 4."""

    def __init__(self, per_row_at_last: bool = False):
        gen = torch.Generator().manual_seed(0)
        self.prompts = [torch.randn(3, 64, generator=gen).requires_grad_() for _ in range(3)]
        self.per_row_at_last = per_row_at_last

    def __call__(self, layer):
        if layer == 2:
            return LayerPrompt(self.prompts[0], "insert", 1)
        if layer == 3:
            return LayerPrompt(self.prompts[1], "blend", None, beta=0.5)
        if layer == 4:
            tokens = self.prompts[2].expand(len(CLASSES), -1, -1) * 1.0 if self.per_row_at_last else self.prompts[2]
            return LayerPrompt(tokens, "replace", None)
        return None


@pytest.mark.parametrize("per_row_at_last", [False, True], ids=["shared-throughout", "joins-rows-at-layer-4"])
@pytest.mark.parametrize("prefix_layer", [None, 2])
def test_shared_beginning_changes_no_feature_or_gradient(backbone, per_row_at_last, prefix_layer):
    tokens = backbone.tokenize([f"a photo of a {c}." for c in CLASSES])
    results = {}
    for on in (False, True):
        with sharing(backbone, on):
            results[on] = _encode(backbone, tokens, InsertThenBlend(per_row_at_last), prefix_layer)
    (f_full, t_full, g_full), (f_shared, t_shared, g_shared) = results[False], results[True]
    assert t_full.shape == t_shared.shape
    assert torch.allclose(f_full, f_shared, atol=1e-6)
    assert torch.allclose(t_full, t_shared, atol=1e-5)
    for a, b in zip(g_full, g_shared):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, config", [
    ("mmrlpp", {}), ("alignednorm", {}), ("zeroshot", {}), ("coop", {}), ("maple", {}), ("promptsrc", {}),
    ("cocoop", {}), ("nemesis", {}), ("empl", {}),
    # class-specific contexts from one phrase: equal by value, separate parameters, so never shared
    ("coop", {"class_specific": True, "ctx_init": "a photo of a"})])
def test_methods_train_and_predict_the_same_with_the_shared_beginning(backbone, name, config):
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 4])
    runs = {}
    for on in (False, True):
        with sharing(backbone, on):
            torch.manual_seed(0)
            method = create_method(name, backbone, config)
            method.set_classnames(CLASSES)
            loss = method.training_step((images, labels))["loss"] if method.learnable_parameters() else None
            grads = []
            if loss is not None:
                loss.backward()
                grads = [p.grad for p in method.learnable_parameters() if p.grad is not None]
            method.eval()
            with torch.no_grad():
                runs[on] = (loss, method.predict(images), grads, method.logit_scale)
    (loss0, logits0, grads0, scale), (loss1, logits1, grads1, _) = runs[False], runs[True]
    # logits are scale·cosine: the cosines agree to float32 rounding
    assert torch.allclose(logits0 / scale, logits1 / scale, atol=1e-6)
    if loss0 is not None:
        assert torch.allclose(loss0, loss1, atol=1e-5)
        assert len(grads0) == len(grads1) > 0
        for a, b in zip(grads0, grads1):  # float32 rounding, relative to the gradient's scale
            assert (a - b).abs().max() <= 2e-5 * a.abs().max()


@pytest.mark.parametrize("tower", ["image", "text"])
def test_attention_through_sdpa_equals_the_recorded_weights_path(backbone, tower):
    """Blocks not asked for attention weights run SDPA; the traced ones the explicit softmax path."""
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(3))
    tokens = backbone.tokenize(["a photo of a cat.", "x"])
    layers = tuple(range(1, backbone.text_layers + 1))
    encode = (lambda t: backbone.encode_image(images, trace=t)) if tower == "image" else \
        (lambda t: backbone.encode_text(tokens, trace=t))
    with torch.no_grad():
        sdpa, manual = Trace(), Trace(attention_layers=layers)
        out_sdpa, out_manual = encode(sdpa), encode(manual)
    assert set(manual.attention) == set(layers) and not sdpa.attention
    assert torch.allclose(out_sdpa.features, out_manual.features, atol=1e-6)
    for layer in layers:
        assert torch.allclose(sdpa.hidden[layer], manual.hidden[layer], atol=1e-5)
        weights = manual.attention[layer]
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("prefix_layer", [None, 2])
def test_chunked_text_tower_gives_the_same_features_and_gradients(backbone, prefix_layer):
    from alignednorm.backbone.chunks import encode_text_in_chunks

    tokens = backbone.tokenize([f"a photo of a {c}." for c in CLASSES])
    results = []
    for chunk in (None, 2):
        hook = InsertThenBlend(per_row_at_last=True)
        prefix = (None if prefix_layer is None
                  else Prefix(prefix_layer, backbone.text_prefix(tokens, prefix_layer).states))
        if chunk is None:
            features = backbone.encode_text(tokens, hook=hook, prefix=prefix).features
        else:
            features = encode_text_in_chunks(backbone, chunk, tokens, hook=hook, prefix=prefix)
        features.square().sum().backward()
        results.append((features.detach(), [p.grad for p in hook.prompts]))
    (full, full_grads), (chunked, chunked_grads) = results
    assert torch.allclose(full, chunked, atol=1e-6)
    for a, b in zip(full_grads, chunked_grads):
        assert (a - b).abs().max() <= 2e-5 * a.abs().max()


def test_text_chunk_setting_trains_to_the_same_numbers(backbone):
    """``train.text_chunk`` reaches the backbone while training, and only then: a chunked MMRL++ epoch
    equals the one-pass epoch, and evaluations after it run unchunked.

    SGD, not Adam: Adam turns float-rounding noise in near-zero gradients into full-size steps.
    """
    from alignednorm.engine.trainer import TrainConfig, Trainer

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
                                          torch.tensor([0, 1, 2, 4]))
    states, seen = [], []
    for chunk in (0, 2):
        torch.manual_seed(0)
        method = create_method("mmrlpp", backbone)
        method.set_classnames(CLASSES)
        config = TrainConfig(epochs=1, batch_size=2, warmup_epochs=0, lr=1e-2, optimizer="sgd", text_chunk=chunk)
        trainer = Trainer(method, config, progress=False,
                          epoch_callback=lambda trainer, epoch, terms: seen.append(backbone.text_chunk))
        trainer._loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=2)
        trainer.fit(data)
        assert seen[-1] == (chunk or None) and backbone.text_chunk is None
        states.append(method.learnable_state_dict())
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])
