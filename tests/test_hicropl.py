"""HiCroPL: proxies and mappers by hand, mapping directions, the two mapping modes, descriptions, teacher, names."""

import logging

import pytest
import torch
import torch.nn.functional as F

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.compat.official import convert_official_state
from alignednorm.errors import ConfigError
from alignednorm.methods import create_method, make_config
from alignednorm.prompts.cross_tower import CrossTowerFlow, KnowledgeMapper, KnowledgeProxy
from alignednorm.prompts.label_space import LabelSpace

CLASSES = ["red circle", "blue square", "green star"]
DESCRIPTIONS = {c: (f"a photo of a {c}.", f"a {c} on a plain background.") for c in CLASSES}


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=1, layers=12))


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0])


def _single_head_attention(q, k, v, attn):
    """softmax(q Wq (k Wk)ᵀ / √d) v Wv, then the output projection: one head, by hand."""
    w, b = attn.in_proj_weight, attn.in_proj_bias
    d = q.shape[-1]
    qp, kp, vp = q @ w[:d].t() + b[:d], k @ w[d:2 * d].t() + b[d:2 * d], v @ w[2 * d:].t() + b[2 * d:]
    probs = torch.softmax(qp @ kp.t() / d ** 0.5, dim=-1)
    return (probs @ vp) @ attn.out_proj.weight.t() + attn.out_proj.bias


def test_knowledge_proxy_by_hand():
    torch.manual_seed(0)
    proxy = KnowledgeProxy(8, heads=1)
    with torch.no_grad():
        for p in proxy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prompts = torch.randn(5, 8)
    ln1 = proxy.ln_1
    pooled = _single_head_attention(ln1(proxy.query), ln1(prompts), ln1(prompts), proxy.attn)
    expected = proxy.ln_2(proxy.query + pooled)
    out = proxy(prompts)
    assert out.shape == (1, 8)
    assert torch.allclose(out, expected, atol=1e-6)
    assert KnowledgeProxy(16, heads=8)(torch.randn(3, 16)).shape == (1, 16)


def test_knowledge_mapper_by_hand():
    torch.manual_seed(1)
    mapper = KnowledgeMapper(width=6, source_width=4, heads=1)
    prompts, proxies = torch.randn(7, 6), torch.randn(2, 4)
    q, k, v = mapper.linear_q(prompts), mapper.linear_k(proxies), mapper.linear_v(proxies)
    q = q + _single_head_attention(mapper.ln_1(q), mapper.ln_1(k), mapper.ln_1(v), mapper.attn)
    h = mapper.ffn.c_fc(mapper.ln_2(q))
    expected = q + mapper.ffn.c_proj(h * torch.sigmoid(1.702 * h))  # 4× QuickGELU FFN with residual
    assert mapper.ffn.c_fc.out_features == 24
    assert torch.allclose(mapper(prompts, proxies), expected, atol=1e-6)


def test_cross_tower_directions_and_shapes():
    torch.manual_seed(2)
    flow = CrossTowerFlow(depth=4, cross_layer=2, text_width=8, vision_width=16, heads=2)
    text = {layer: torch.randn(3, 8) for layer in range(1, 5)}
    vision = {layer: torch.randn(3, 16) for layer in range(1, 5)}
    out = flow(text, vision)
    assert sorted(out.vision) == [1, 2] and sorted(out.text) == [3, 4]
    assert out.vision[1].shape == (3, 16) and out.text[4].shape == (3, 8)
    assert out.text_proxies.shape == (2, 8) and out.vision_proxies.shape == (2, 16)
    # text -> vision in layers 1..k: every visual prompt of 1..k sees every text layer of 1..k (multi-scale) ...
    changed = flow({**text, 1: text[1] + torch.randn(3, 8)}, vision)
    assert not torch.allclose(changed.vision[1], out.vision[1]) and not torch.allclose(changed.vision[2], out.vision[2])
    assert all(torch.equal(changed.text[layer], out.text[layer]) for layer in (3, 4))
    # ... and vision -> text in layers k+1..d; the text prompts past k are only queries there.
    changed = flow({**text, 3: text[3] + torch.randn(3, 8)}, {**vision, 4: vision[4] + torch.randn(3, 16)})
    assert all(torch.equal(changed.vision[layer], out.vision[layer]) for layer in (1, 2))
    assert not torch.allclose(changed.text[3], out.text[3])
    # All proxies of a direction start equal (official _get_clones), as do their query tokens.
    assert torch.equal(flow.text_proxies["1"].query, flow.text_proxies["2"].query)
    with pytest.raises(ConfigError, match="mapper_heads = 3 does not divide the text width 8"):
        CrossTowerFlow(4, 2, 8, 12, heads=3)
    one_way = CrossTowerFlow(depth=3, cross_layer=3, text_width=8, vision_width=8, heads=2)
    prompts = {layer: torch.randn(3, 8) for layer in range(1, 4)}
    assert not hasattr(one_way, "vision_to_text") and one_way(prompts, prompts).text == {}


def test_reference_mode_gradients_and_in_place_mapping(backbone):
    method = create_method("hicropl", backbone)  # default: mapping reference
    method.set_classnames(CLASSES)
    cross = dict(method.cross.named_parameters())
    assert all(not p.requires_grad for p in cross.values())
    learnable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert learnable == {f"{t}_prompts.{b}" for t in ("text", "vision") for b in range(1, 13)}
    expected = method.mapping()
    method.train()
    images, labels = _batch()
    terms = method.training_step((images, labels))
    terms["loss"].backward()
    # The mapper output was written into the prompts of the mapped layers (vision 1..k, text k+1..d).
    assert torch.equal(method.vision_prompts["3"], expected.vision[3])
    assert torch.equal(method.text_prompts["9"], expected.text[9])
    # Gradients exactly where the official code has them: every prompt, nothing in the cross-tower nets.
    assert all(method.get_parameter(n).grad is not None and method.get_parameter(n).grad.any() for n in learnable)
    assert all(p.grad is None for p in cross.values())
    # eval_remaps off: an eval forward maps the stored values again, without writing them back.
    stored = {k: v.clone() for k, v in method.learnable_state_dict().items()}
    method.eval()
    with method.overridden({"eval_remaps": False}):
        method.predict(images)
        assert all(torch.equal(stored[k], v) for k, v in method.learnable_state_dict().items())
        _, vision = method.prompts_in_use()
        assert torch.equal(vision[2], method.mapping().vision[2])
        assert not torch.equal(vision[2], method.vision_prompts["2"])


def _map_stored(cross, text: dict, vision: dict, times: int) -> tuple[dict, dict]:
    """The official prompt learner's forward ``times`` times: mapper outputs written over the stored prompts."""
    text, vision = dict(text), dict(vision)
    with torch.no_grad():
        for _ in range(times):
            mapped = cross(text, vision)
            vision.update(mapped.vision)
            text.update(mapped.text)
    return text, vision


def test_official_evaluation_rewrites_the_prompts_per_batch(backbone):
    """Official (default ``eval_remaps``): eval batch j runs on the prompts mapped j times, and they stay so."""
    method = create_method("hicropl", backbone)
    method.set_classnames(CLASSES)
    with torch.no_grad():
        for p in method.learnable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    text0, vision0 = ({b: t.detach().clone() for b, t in d.items()} for d in method.stored_prompts())
    method.eval()
    images, _ = _batch()
    logits = [method.predict(images) for _ in range(3)]
    text, vision = _map_stored(method.cross, text0, vision0, 3)
    stored_text, stored_vision = method.stored_prompts()
    assert all(torch.allclose(stored_vision[b], vision[b], atol=1e-6) for b in vision)
    assert all(torch.allclose(stored_text[b], text[b], atol=1e-6) for b in text)
    assert not torch.allclose(logits[0], logits[2])  # the prompts drift with the number of batches
    # The first batch equals the side-effect-free evaluation of the start values.
    fresh = create_method("hicropl", backbone, {"eval_remaps": False})
    fresh.set_classnames(CLASSES)
    fresh.load_learnable_state_dict({**method.learnable_state_dict(),
                                     **{f"text_prompts.{b}": t for b, t in text0.items()},
                                     **{f"vision_prompts.{b}": t for b, t in vision0.items()}})
    fresh.eval()
    assert torch.allclose(fresh.predict(images), logits[0], atol=1e-5)


def test_validation_remaps_carry_into_training(backbone):
    """Official Dassl validates after each epoch before saving: the kept (best-epoch) prompts include
    one mapping per validation batch. Expected values from the official algorithm (:func:`_map_stored`)."""
    from alignednorm.engine.trainer import TrainConfig, Trainer

    images, labels = _batch()
    dataset = list(zip(images, labels))
    for remaps in (True, False):
        torch.manual_seed(0)
        method = create_method("hicropl", backbone, {"eval_remaps": remaps})
        method.set_classnames(CLASSES)
        states = []

        def validate(m, states=states):
            m.eval()
            before = tuple({b: t.detach().clone() for b, t in d.items()} for d in m.stored_prompts())
            with torch.no_grad():
                for _ in range(2):  # two validation batches
                    m.predict(images)
            states.append((before, tuple({b: t.detach().clone() for b, t in d.items()} for d in m.stored_prompts())))
            return 50.0  # a tie every epoch: the first is kept (Dassl's strict >)

        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, optimizer="adam", warmup_epochs=0, select="best-val")
        Trainer(method, cfg, None, progress=False).fit(dataset, resume=False, validate=validate)
        (text0, vision0), (text1, vision1) = states[0]
        text, vision = _map_stored(method.cross, text0, vision0, 2 if remaps else 0)
        assert all(torch.allclose(vision1[b], vision[b], atol=1e-6) for b in vision)
        assert all(torch.allclose(text1[b], text[b], atol=1e-6) for b in text)
        kept_text, kept_vision = method.stored_prompts()  # the best (first) epoch, as saved after validation
        assert all(torch.equal(kept_vision[b], vision1[b]) for b in vision1)
        assert all(torch.equal(kept_text[b], text1[b]) for b in text1)
        assert remaps != all(torch.equal(vision0[b], vision1[b]) for b in vision0)

def test_differentiable_mode_gradients_everywhere(backbone):
    method = create_method("hicropl", backbone, {"mapping": "differentiable"})
    method.set_classnames(CLASSES)
    with torch.no_grad():
        for p in method.learnable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = {k: v.clone() for k, v in method.learnable_state_dict().items()}
    method.train()
    method.training_step(_batch())["loss"].backward()
    names = [n for n, p in method.named_parameters() if p.requires_grad]
    assert any(n.startswith("cross.text_to_vision.") for n in names) and any(".query" in n for n in names)
    assert [n for n in names if method.get_parameter(n).grad is None or not method.get_parameter(n).grad.any()] == []
    # Nothing is written in place: the stored prompts are the mapper's inputs.
    assert all(torch.equal(before[k], v) for k, v in method.learnable_state_dict().items())


def test_both_modes_save_the_same_tensors(backbone):
    reference = create_method("hicropl", backbone)
    differentiable = create_method("hicropl", backbone, {"mapping": "differentiable"})
    state = reference.learnable_state_dict()
    assert sorted(state) == sorted(differentiable.learnable_state_dict())
    assert any(k.startswith("cross.") for k in state)  # the frozen mappers are saved: every eval maps through them
    differentiable.load_learnable_state_dict(state)
    for m in (reference, differentiable):
        m.set_classnames(CLASSES)
        m.eval()
    images, _ = _batch()
    assert torch.allclose(reference.predict(images), differentiable.predict(images), atol=1e-5)


def test_description_fallback_is_warned_once_and_exposed(backbone, caplog):
    method = create_method("hicropl", backbone)
    method.set_classnames(CLASSES)
    assert method.used_description_fallback
    with caplog.at_level(logging.WARNING, logger="alignednorm.methods.hicropl"):
        method.train()
        terms = method.training_step(_batch())
        method.set_classnames(CLASSES[:2])
        method.description_features()
    assert float(terms["description_fallback"]) == 1.0
    assert sum("no class descriptions" in r.message for r in caplog.records) == 1
    assert torch.allclose(method.description_features(), method.frozen_text_features())
    with pytest.raises(AttributeError):
        method.used_description_fallback = False


def test_descriptions_give_the_fixed_embeddings(backbone):
    method = create_method("hicropl", backbone)
    method.set_label_space(LabelSpace(tuple(CLASSES), descriptions=DESCRIPTIONS, description_source="d.json"))
    assert not method.used_description_fallback
    rows = []
    for c in CLASSES:  # per sentence normalised, averaged, normalised again
        f = F.normalize(backbone.encode_text(backbone.tokenize(list(DESCRIPTIONS[c]))).features, dim=-1)
        rows.append(F.normalize(f.mean(dim=0), dim=-1))
    assert torch.allclose(method.description_features(), torch.stack(rows), atol=1e-6)
    method.train()
    assert float(method.training_step(_batch())["description_fallback"]) == 0.0
    long = {c: ("word " * 80,) for c in CLASSES}
    method.set_label_space(LabelSpace(tuple(CLASSES), descriptions=long, description_source="long.json"))
    with pytest.raises(ConfigError, match="long.json: class 'red circle'"):
        method.description_features()


def test_fusion_and_loss_terms(backbone):
    method = create_method("hicropl", backbone, {"distill_weight": 2.0})
    method.set_classnames(CLASSES)
    method.train()
    images, labels = _batch()
    terms, outputs, mapped = method.compute_terms(images, labels)
    b = outputs.branches
    image = F.normalize(F.normalize(b["image_features_prompted"], dim=-1) + b["frozen_image_features"], dim=-1)
    assert torch.allclose(b["image_features"], image, atol=1e-6)
    text = F.normalize(F.normalize(b["text_features_prompted"], dim=-1) + b["frozen_text_features"], dim=-1)
    assert torch.allclose(b["text_features"], text, atol=1e-6)
    distill = ((1 - (text * b["frozen_text_features"]).sum(-1).mean())
               + (1 - (image * b["frozen_image_features"]).sum(-1).mean()))
    assert torch.allclose(terms["loss"], F.cross_entropy(outputs.logits, labels) + 2.0 * distill, atol=1e-5)
    assert mapped is not None and sorted(mapped.vision) == list(range(1, 7))


def test_teacher_checkpoint(backbone, tmp_path):
    path = save_openai_state_dict(make_tiny_clip(seed=5, layers=2), tmp_path / "teacher.pt", half=False)
    method = create_method("hicropl", backbone, {"teacher_checkpoint": str(path)})
    method.set_classnames(CLASSES)
    images, _ = _batch()
    teacher = ClipBackbone.from_file(path)
    expected = F.normalize(teacher.encode_image(images).features, dim=-1)
    assert torch.allclose(method.frozen_image_features(images), expected, atol=1e-6)
    other = save_openai_state_dict(make_tiny_clip(seed=5, layers=2, embed_dim=16), tmp_path / "narrow.pt", half=False)
    with pytest.raises(ConfigError, match="narrow.pt.*embedding width 16"):
        create_method("hicropl", backbone, {"teacher_checkpoint": str(other)})


def test_config_checks():
    with pytest.raises(ConfigError, match="mapping = 'detached'"):
        make_config("hicropl", {"mapping": "detached"})
    with pytest.raises(ConfigError, match="cross_layer = 7 is out of range"):
        make_config("hicropl", {"prompt_depth": 6, "cross_layer": 7})


def test_official_names(backbone):
    method = create_method("hicropl", backbone, {"n_ctx": 2, "prompt_depth": 4, "cross_layer": 1})
    official = {"prompt_learner.ctx": 0, "prompt_learner.cross_prompts_text.3": 1,
                "prompt_learner.cross_prompts_visual.0": 2, "prompt_learner.text_proxy_token.0": 3,
                "prompt_learner.attn_pooling_text_nets.0.ln_1.weight": 4, "prompt_learner.visual_proxy_token.2": 5,
                "prompt_learner.attn_pooling_visual_nets.0.attn.in_proj_weight": 6,
                "prompt_learner.text2visual_net.linear_k.weight": 7, "prompt_learner.visual2text_net.ffn.c_fc.bias": 8,
                "prompt_learner.ZS_image_encoder.conv1.weight": 9, "prompt_learner.token_prefix": 10}
    ours = convert_official_state({k: torch.tensor(v) for k, v in official.items()}, "hicropl")
    assert {k: int(v) for k, v in ours.items()} == {
        "text_prompts.1": 0, "text_prompts.4": 1, "vision_prompts.1": 2, "cross.text_proxies.1.query": 3,
        "cross.text_proxies.1.ln_1.weight": 4, "cross.vision_proxies.4.query": 5,
        "cross.vision_proxies.2.attn.in_proj_weight": 6, "cross.text_to_vision.linear_k.weight": 7,
        "cross.vision_to_text.ffn.c_fc.bias": 8}
    assert set(ours) <= set(method.learnable_state_dict())
