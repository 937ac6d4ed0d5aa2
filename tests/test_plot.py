"""PLOT and PLOT + Nemesis: Sinkhorn, prompt sets, local features, config refusals, parity with the official code."""

import json

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import Trace
from alignednorm.backbone.tiny import save_openai_state_dict
from alignednorm.errors import ConfigError
from alignednorm.losses.nemesis import omega_schedule
from alignednorm.methods import StepState, create_method, make_config
from alignednorm.prompts.optimal_transport import ot_scores, sinkhorn
from alignednorm.prompts.text_context import TextContext

CLASSES = ["red circle", "blue square", "green triangle"]


def tiny_resnet_clip(seed: int = 3, width: int = 8, image_size: int = 64, embed_dim: int = 32) -> CLIP:
    """A random ModifiedResNet CLIP (stages of one block) with a 2-layer text tower."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=width, image_size=image_size, head_width=width * 32 // 4)
    return CLIP(embed_dim, vision_cfg=vision, text_cfg=CLIPTextCfg(context_length=77, width=64, heads=1, layers=2),
                quick_gelu=True).eval()


@pytest.fixture(scope="module")
def resnet_backbone():
    return ClipBackbone(tiny_resnet_clip())


# ---------------------------------------------------------------------- optimal transport
def test_sinkhorn_converges_to_uniform_marginals():
    cost = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0)) * 2
    transport = sinkhorn(cost, eps=0.5, max_iter=1000, threshold=0.0)
    assert transport.iterations == 1000 and not transport.plan.requires_grad
    assert torch.allclose(transport.plan.sum(dim=2), torch.full((3, 5), 1 / 5), atol=1e-6)
    assert torch.allclose(transport.plan.sum(dim=1), torch.full((3, 4), 1 / 4), atol=1e-6)


def test_sinkhorn_stops_on_the_mean_change_of_the_row_scaling():
    cost = torch.rand(6, 5, 4, generator=torch.Generator().manual_seed(1))
    transport = sinkhorn(cost, eps=0.1, max_iter=100, threshold=0.01)
    assert 1 < transport.iterations < 100 and float(transport.error) < 0.01
    # one iteration fewer: the change was still above the threshold
    shorter = sinkhorn(cost, eps=0.1, max_iter=transport.iterations - 1, threshold=0.01)
    assert float(shorter.error) >= 0.01
    assert torch.equal(transport.plan, transport.r.unsqueeze(-1) * transport.c.unsqueeze(-2) * transport.kernel)


def test_sinkhorn_refuses_a_non_finite_plan():
    with pytest.raises(FloatingPointError, match="eps = 0.0001"):
        sinkhorn(torch.full((1, 2, 2), 2.0), eps=1e-4)


def test_ot_scores_gradient_flows_through_the_similarity_only():
    gen = torch.Generator().manual_seed(2)
    local = torch.randn(2, 5, 8, generator=gen)
    prompts = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    out = ot_scores(local, prompts)
    assert out.scores.shape == (2, 4) and out.similarity.shape == (8, 5, 3)
    cost_view = 1 - (out.transport.plan * (1 - out.similarity)).sum(dim=(1, 2)).view(2, 4)
    assert torch.allclose(out.scores, cost_view, atol=1e-6)  # the plan has total mass 1
    expected = torch.autograd.grad((out.transport.plan * out.similarity).sum(), prompts, retain_graph=True)[0]
    out.scores.sum().backward()
    assert torch.allclose(prompts.grad, expected, atol=1e-6) and prompts.grad.abs().sum() > 0


# ---------------------------------------------------------------------- backbone and prompt sets
def test_image_tokens_resnet_and_vit(resnet_backbone, tiny_backbone):
    images = torch.randn(2, 3, 64, 64)
    trace = Trace()
    tokens = resnet_backbone.encode_image_tokens(images, trace=trace)
    assert tokens.shape == (2, 1 + 2 * 2, 32) and sorted(trace.hidden) == [1, 2, 3, 4]
    assert torch.allclose(tokens[:, 0], resnet_backbone.encode_image(images).features, atol=1e-6)
    images = torch.randn(2, 3, 32, 32)
    tokens = tiny_backbone.encode_image_tokens(images)
    assert tokens.shape == (2, 1 + 4, tiny_backbone.embed_dim)
    assert torch.allclose(tokens[:, 0], tiny_backbone.encode_image(images).features, atol=1e-6)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_prompt_sets_are_set_major_coop_prompts(position, tiny_backbone):
    method = create_method("plot", tiny_backbone, {"n_sets": 3, "n_ctx": 4, "class_token_position": position})
    method.set_classnames(CLASSES)
    embeddings, ids = method.context()
    assert embeddings.shape[0] == ids.shape[0] == 9
    single = TextContext(tiny_backbone, 4, position=position)
    single.set_classnames(tiny_backbone, CLASSES)
    for n in range(3):
        assert torch.equal(embeddings[3 * n : 3 * n + 3], single.embeddings(method.context.ctx[n]))
        assert torch.equal(ids[3 * n : 3 * n + 3], single.token_ids)


@pytest.mark.parametrize(("values", "message"), [
    ({"ctx_init": "a photo of a"}, "ctx_init = 'a photo of a'; PLOT's prompt sets start from random"),
    ({"class_specific": True}, "class_specific = True; PLOT's prompt sets are shared"),
    ({"local_features": "grid"}, "local_features = 'grid'; expected one of"),
    ({"ot_eps": 0.0}, "ot_eps = 0.0; expected a positive"),
    ({"n_sets": 0}, "n_sets = 0 is out of range"),
])
def test_config_refusals(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config("plot", values)


def test_plot_nemesis_defaults_follow_the_paper():
    config = make_config("plot_nemesis")
    assert (config.omega, config.n_sets, config.n_ctx, config.terms) == (0.1, 4, 16, "pun")


# ---------------------------------------------------------------------- methods
def test_spatial_local_features_drop_the_pooled_token(resnet_backbone):
    images = torch.randn(2, 3, 64, 64)
    outputs = {}
    for mode in ("all", "spatial"):
        method = create_method("plot", resnet_backbone, {"n_sets": 2, "local_features": mode}).eval()
        torch.manual_seed(0)
        method.context.ctx.data.normal_(std=0.02)
        method.set_classnames(CLASSES)
        outputs[mode] = method(images)
    assert outputs["all"].branches["ot_plan"].shape == (6, 5, 2)
    assert outputs["spatial"].branches["ot_plan"].shape == (6, 4, 2)
    assert not torch.allclose(outputs["all"].logits, outputs["spatial"].logits)


def test_pun_sums_over_the_sets_and_pan_scores_corrupted_sets(tiny_backbone):
    method = create_method("plot_nemesis", tiny_backbone, {"n_sets": 3, "n_ctx": 4, "terms": "both", "beta": 0.25,
                                                            "omega": 2.0, "pan_positions": 2})
    method.set_classnames(CLASSES)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    method.train()
    step = method.compute_step(images, labels, StepState(epoch=3, max_epochs=10), positions=[1, 3])
    norms = method.context.ctx.detach().norm(dim=-1)  # (N, L)
    assert float(step.terms["pun"]) == pytest.approx(2.0 * norms.mean(dim=1).sum().item(), rel=1e-5)
    logits = step.pan.logits
    assert logits.shape == (3, 4, 3) and torch.allclose(logits[0], step.outputs.logits.detach(), atol=1e-5)
    corrupted = method.context.ctx.detach().clone()
    corrupted[:, 3] *= method.config.tau  # position 3 in every set
    with torch.no_grad():
        text = method.encode_prompts(*method.context(corrupted), built_alike=False)
        local = method.local_features(images)
        assert torch.allclose(logits[2], method.logit_scale * method.scores(local, text).scores, atol=1e-5)
    omega_e = omega_schedule(3, 10)
    expected = step.terms["ce"] + omega_e * (0.25 * step.terms["pun"] + 0.75 * step.terms["pan"])
    assert float(step.terms["loss"].detach()) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("fixture", ["plot_a", "plot_nemesis_a"])
def test_parity_with_the_official_trainers(fixture, shared_dir):
    from alignednorm.compat.parity import run_parity

    path = shared_dir / "reference" / fixture
    assert path.is_dir(), f"{path}: the shared PLOT fixture is missing"
    report = run_parity(path)
    assert report["ok"], report["failed"]
    reference = json.loads((path / "manifest.json").read_text())["tensors"]["outputs.safetensors"]
    assert set(reference) <= set(report["tensors"])  # every tensor of the fixture compared


@pytest.mark.parametrize("variant", ["sets2_middle_spatial_mixed", "sets1_front_pan"])
def test_parity_reads_every_setting_from_the_manifest(variant, shared_dir, tmp_path):
    """Held-back-like fixtures (other N, context length, position, epoch, ω_E, PUN+PAN, local features,
    CLIP geometry) go through the same code; outputs are our own, so this checks nothing is tied to
    fixture A's settings, not the official numbers (the shared fixtures do that)."""
    from conftest import self_parity_fixture

    from alignednorm.compat.parity import method_from_manifest

    source = shared_dir / "reference" / "plot_nemesis_a"
    assert source.is_dir(), f"{source}: the shared PLOT+Nemesis fixture is missing"
    manifest = json.loads((source / "manifest.json").read_text())
    section = manifest["config"]["TRAINER.PLOTNemesis"]
    if variant == "sets2_middle_spatial_mixed":
        section.update(N=2, N_CTX=6, CLASS_TOKEN_POSITION="middle", BETA=0.4, A=0.1, NP=2, CW=0.25)
        positions, epoch, epochs, spatial = [4, 1], 37, 50, True
    else:
        section.update(N=1, N_CTX=4, CLASS_TOKEN_POSITION="front", BETA=0.0, NP=1, NT="one")
        positions, epoch, epochs, spatial = [2], 3, 10, False
    manifest["nemesis"].update(epoch=epoch, max_epoch=epochs, pan={"pos_list": positions})
    manifest["tiny_clip"]["local_tokens"] = 4
    manifest["sequence_layout"]["image_tokens_M"] = 4 if spatial else 5
    manifest["plot"]["sinkhorn"].update(eps=0.2, max_iter=50, stop="break when err.item() < 0.005")
    manifest["optimizer_step"]["lr_at_step"] = 0.0015
    manifest["class_names"] = [f"shape number {i}" for i in range(4)]
    fixture = tmp_path / variant
    fixture.mkdir()
    (fixture / "manifest.json").write_text(json.dumps(manifest))
    save_openai_state_dict(tiny_resnet_clip(seed=7, width=16), fixture / "clip_tiny.safetensors")
    name, config = method_from_manifest(manifest)
    assert (config["ot_eps"], config["ot_max_iter"], config["ot_threshold"]) == (0.2, 50, 0.005)
    assert config["local_features"] == ("spatial" if spatial else "all")
    method = create_method(name, ClipBackbone.from_file(fixture / "clip_tiny.safetensors"), config)
    method.set_classnames(manifest["class_names"])
    prompts = [f"{method.context.prompt_prefix} {c}." for c in manifest["class_names"]] * section["N"]
    ours = self_parity_fixture(fixture, manifest, method, prompts, torch.randn(3, 3, 64, 64), torch.tensor([3, 0, 2]))
    assert float(ours["schedule.omega"]) == omega_schedule(epoch, epochs)
    assert ours["after_step.prompt_learner.ctx"].shape == (section["N"], section["N_CTX"], 64)
    assert ours["pan.inference_logits"].shape == (len(positions) + 1, 3, 4)
    assert ours["train.image_features"].shape == ((4 if spatial else 5), 3, 32)


def test_presets_follow_the_official_configs():
    from alignednorm.config import resolve_config

    for name in ("plot", "plot_nemesis"):
        epochs = [resolve_config(name, "fewshot", "dtd", shots=k).train.epochs for k in (1, 2, 4, 8, 16)]
        assert epochs == [50, 100, 100, 200, 200]  # rn50_ep50, rn50_ep100 (2, 4 shots), rn50
        train = resolve_config(name, "fewshot", "caltech101", shots=16).train
        assert (train.lr, train.batch_size, train.warmup_lr) == (0.002, 32, 1e-5)
    pets = resolve_config("plot_nemesis", "fewshot", "oxford_pets", shots=4).method
    assert (pets.omega, pets.pan_omega, pets.omega_schedule) == (0.1, 50.0, False)


def test_coop_corruption_tables_refuse_plot(tiny_backbone):
    from alignednorm.analysis.corruption import corruption_sweep

    method = create_method("plot", tiny_backbone, {"n_sets": 2, "n_ctx": 4})
    method.set_classnames(CLASSES)
    with pytest.raises(ConfigError, match="optimal transport over local features"):
        corruption_sweep(method, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))])
