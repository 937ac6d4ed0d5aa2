"""Nemesis: PUN / PAN norms and weights by hand, the ω_E schedule, the method's terms, logs and parity variants."""

import json
import math

import pytest
import torch

from alignednorm.errors import ConfigError
from alignednorm.losses.nemesis import (
    corrupted_contexts,
    logged_position_norms,
    matrix_norm,
    omega_schedule,
    pan_weights,
    position_norms,
    pun_weights,
    random_pan_weights,
    weighted_norm,
)
from alignednorm.methods import StepState, create_method, make_config

CLASSES = ["red circle", "blue square", "green triangle"]
# Three positions of width 2: ‖·‖₂ = 5, √2, 2; ‖·‖₁ = 7, 2, 2; ‖·‖∞ = 4, 1, 2.
CTX = torch.tensor([[3.0, 4.0], [1.0, -1.0], [0.0, 2.0]])


@pytest.mark.parametrize("norm,expected", [("l2", [5.0, math.sqrt(2), 2.0]), ("l1", [7.0, 2.0, 2.0]),
                                           ("linf", [4.0, 1.0, 2.0])])
def test_position_norms_by_hand(norm, expected):
    assert position_norms(CTX, norm).tolist() == pytest.approx(expected)


def test_pun_and_pan_weighted_norms_by_hand():
    norms = position_norms(CTX)
    # PUN: ω at every position, divided by M = L: ω times the mean norm.
    assert float(weighted_norm(pun_weights(3, 2.0), norms)) == pytest.approx(2.0 * (5 + math.sqrt(2) + 2) / 3)
    # PAN: only position 1 selected, M = 1.
    assert float(weighted_norm(torch.tensor([0.0, 2.0, 0.0]), norms)) == pytest.approx(2 * math.sqrt(2))
    # Positions 0 and 2 selected: M = 2.
    assert float(weighted_norm(torch.tensor([1.0, 0.0, 1.0]), norms)) == pytest.approx(3.5)
    # Nothing selected: divided by 1, exactly 0 with a zero gradient.
    ctx = CTX.clone().requires_grad_()
    loss = weighted_norm(torch.zeros(3), position_norms(ctx))
    loss.backward()
    assert float(loss.detach()) == 0.0 and not ctx.grad.any()


def test_class_specific_sum_rule():
    """Class-specific contexts: α broadcasts over classes; the loss sums the classes' position means."""
    csc = torch.stack([CTX, 2 * CTX])  # (C=2, L=3, W=2)
    pun = weighted_norm(pun_weights(3, 1.0), position_norms(csc))
    assert float(pun) == pytest.approx(3 * (5 + math.sqrt(2) + 2) / 3)  # 1× + 2× the mean
    assert logged_position_norms(csc).tolist() == pytest.approx([7.5, 1.5 * math.sqrt(2), 3.0])
    assert float(matrix_norm(csc)) == pytest.approx(1.5 * math.sqrt(25 + 2 + 4))


@pytest.mark.parametrize("epochs,epoch,value", [(50, 0, 0.993), (50, 12, 0.931), (50, 25, 0.5), (50, 37, 0.083),
                                                (50, 49, 0.008), (10, 0, 0.731), (10, 9, 0.310), (200, 100, 0.5)])
def test_omega_schedule_values(epochs, epoch, value):
    assert omega_schedule(epoch, epochs) == pytest.approx(value, abs=5e-4)


def test_omega_schedule_fixture_value():
    assert omega_schedule(0, 200) == 0.9999999979388464  # shared/reference nemesis_*_a, schedule.omega


def test_corrupted_contexts():
    ctx = CTX.clone()
    sets = corrupted_contexts(ctx, [2, 0], 0.5)
    assert sets.shape == (3, 3, 2) and torch.equal(sets[0], ctx) and torch.equal(ctx, CTX)
    assert sets[1].tolist() == [[3, 4], [1, -1], [0, 1]] and sets[2].tolist() == [[1.5, 2], [1, -1], [0, 2]]
    csc = corrupted_contexts(torch.stack([CTX, CTX]), [1], 0.1)  # every class's vector at position 1
    assert torch.allclose(csc[1][:, 1], 0.1 * CTX[1].expand(2, -1))


def test_pan_weights_strictly_more_correct():
    labels = torch.tensor([0, 1, 2, 0])
    clean = torch.eye(3)[[0, 1, 0, 1]]  # 2 correct
    better = torch.eye(3)[[0, 1, 2, 1]]  # 3 correct
    tie = torch.eye(3)[[0, 2, 2, 1]]  # 2 correct: ties do not count
    decision = pan_weights(torch.stack([clean, better, tie]), labels, [4, 1], length=6, omega=10.0)
    assert decision.alpha.tolist() == [0, 0, 0, 0, 10.0, 0]
    assert int(decision.ori_correct) == 2 and decision.crt_correct.tolist() == [3, 2]
    assert decision.pred.shape == (3, 4) and decision.selected == [4]
    # A batch of one (the official squeeze would mis-shape it).
    wrong, right = torch.tensor([[0.0, 1, 0]]), torch.tensor([[1.0, 0, 0]])  # label 0
    one = pan_weights(torch.stack([wrong, right]), labels[:1], [2], 3, 1.0)
    assert one.alpha.tolist() == [0, 0, 1.0]
    assert random_pan_weights([0, 2], 3, 5.0).alpha.tolist() == [5.0, 0, 5.0]


def test_config_checks():
    with pytest.raises(ConfigError, match="tau = 1.0"):
        make_config("nemesis", {"tau": 1.0})
    with pytest.raises(ConfigError, match="beta = 1.0; with terms='both'"):
        make_config("nemesis", {"terms": "both", "beta": 1.0})
    with pytest.raises(ConfigError, match="terms = 'pen'"):
        make_config("nemesis", {"terms": "pen"})
    with pytest.raises(ConfigError, match="norm = 'l3'"):
        make_config("nemesis", {"norm": "l3"})
    with pytest.raises(ConfigError, match="omega = -1.0 is out of range"):
        make_config("nemesis", {"omega": -1.0})


def test_pan_positions_past_the_context(tiny_backbone):
    with pytest.raises(ConfigError, match="pan_positions = 5 exceeds the context length 4"):
        create_method("nemesis", tiny_backbone, {"n_ctx": 4, "pan_positions": 5})


def _method(backbone, **config):
    torch.manual_seed(0)
    method = create_method("nemesis", backbone, {"n_ctx": 4, **config})
    method.set_classnames(CLASSES)
    method.train()
    return method


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0])


def test_pun_step_terms(tiny_backbone):
    method = _method(tiny_backbone, omega=3.0)
    method.on_epoch_start(StepState(epoch=12, max_epochs=50))
    step = method.compute_step(*_batch())
    omega_e = omega_schedule(12, 50)
    expected_pun = 3.0 * method.context.ctx.detach().norm(dim=-1).mean()
    assert step.omega_e == omega_e and float(step.terms["omega_e"]) == pytest.approx(omega_e)
    assert float(step.terms["pun"]) == pytest.approx(float(expected_pun), rel=1e-6)
    assert float(step.terms["loss"].detach()) == pytest.approx(float(step.terms["ce"] + omega_e * expected_pun),
                                                               rel=1e-6)
    assert {f"ctx_norm_{j}" for j in range(4)} <= set(step.terms) and "pan" not in step.terms
    # The trainer's step state wins over the epoch hook; the schedule can be switched off.
    assert method.compute_step(*_batch(), state=StepState(epoch=49, max_epochs=50)).omega_e == omega_schedule(49, 50)
    assert _method(tiny_backbone, omega_schedule=False).compute_step(*_batch()).omega_e == 1.0


def test_zero_omega_is_coop(tiny_backbone):
    """With ω = 0 the gradient is CoOp's CE gradient on the same context."""
    images, labels = _batch()
    nemesis = _method(tiny_backbone, omega=0.0, terms="both", beta=0.3)
    torch.manual_seed(0)
    coop = create_method("coop", tiny_backbone, {"n_ctx": 4})
    coop.set_classnames(CLASSES)
    coop.load_learnable_state_dict(nemesis.learnable_state_dict())
    coop.train()
    nemesis.compute_step(images, labels).terms["loss"].backward()
    coop.training_step((images, labels))["loss"].backward()
    assert torch.allclose(nemesis.context.ctx.grad, coop.context.ctx.grad, atol=1e-7)


def test_pan_step(tiny_backbone):
    images, labels = _batch()
    method = _method(tiny_backbone, terms="pan", pan_omega=50.0, pan_positions=2)
    before = method.context.ctx.detach().clone()
    step = method.compute_step(images, labels, positions=[3, 1])
    assert torch.equal(method.context.ctx.detach(), before)  # the pre-inference changes nothing
    decision = step.pan
    assert decision.positions == [3, 1] and decision.logits.shape == (3, 4, 3)
    # Set 0 is the clean forward; sets 1 and 2 rescale positions 3 and 1 by τ.
    assert torch.allclose(decision.logits[0], step.outputs.logits.detach(), atol=1e-5)
    for n, j in enumerate([3, 1], start=1):
        corrupted = method.context.ctx.detach().clone()
        corrupted[j] *= 0.5
        with torch.no_grad():
            text = method.encode_prompts(method.context.embeddings(corrupted), method.context.token_ids)
            expected = method.cosine_logits(step.outputs.branches["image_features_unnorm"], text)[0]
        assert torch.allclose(decision.logits[n], expected, atol=1e-5)
    selected = (decision.crt_correct > decision.ori_correct).float() * 50.0
    assert decision.alpha[[3, 1]].tolist() == selected.tolist()
    norms = method.context.ctx.detach().norm(dim=-1)
    count = max(1, int((selected > 0).sum()))
    assert float(step.terms["pan"]) == pytest.approx(float((selected * norms[[3, 1]]).sum() / count), abs=1e-6)
    assert {f"pan_selected_{j}" for j in range(4)} <= set(step.terms)
    # Without the search the drawn positions are weighted unconditionally; draws are Python's random.
    plain = _method(tiny_backbone, terms="pan", pan_search=False)
    assert plain.compute_step(images, labels, positions=[2]).pan.alpha.tolist() == [0, 0, 1.0, 0]
    import random

    random.seed(5)
    drawn = plain.draw_positions()
    random.seed(5)
    assert drawn == random.sample(range(4), 1)


def test_class_specific_pan(tiny_backbone):
    method = _method(tiny_backbone, terms="both", beta=0.25, class_specific=True)
    step = method.compute_step(*_batch(), positions=[0])
    assert method.context.ctx.shape[0] == 3 and step.pan.logits.shape == (2, 4, 3)
    norms = method.context.ctx.detach().norm(dim=-1)  # (C, L)
    assert float(step.terms["pun"]) == pytest.approx(float(norms.mean(dim=1).sum()), rel=1e-6)


def test_norms_in_the_run_log(tiny_backbone, tmp_path):
    """The per-position norms and ω_E reach log.jsonl every step and as epoch means, without trainer code for it."""
    from alignednorm.engine.trainer import TrainConfig, Trainer

    method = _method(tiny_backbone, terms="pan")
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 3)
    config = TrainConfig(epochs=2, batch_size=4, optimizer="sgd", lr=0.002, log_every=1, tensorboard=False)
    Trainer(method, config, run_dir=tmp_path, progress=False).fit(data)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    means = [line["epoch_mean"] for line in lines if "epoch_mean" in line]
    assert len(means) == 2
    assert [m["omega_e"] for m in means] == pytest.approx([omega_schedule(0, 2), omega_schedule(1, 2)])
    assert all({f"ctx_norm_{j}" for j in range(4)} | {f"pan_selected_{j}" for j in range(4)} <= set(m) for m in means)
    assert means[1]["ctx_norm_0"] != means[0]["ctx_norm_0"]


@pytest.mark.parametrize("variant", ["csc_mixed", "word_init_random_np"])
def test_parity_reads_every_setting_from_the_manifest(variant, shared_dir, tmp_path):
    """Held-back-like fixtures (CSC, word init, mixed β, other epoch, NP, CW, A, widths, classes, batch)
    go through the same code. Their outputs are our own, so this checks that nothing is tied to
    fixture A's settings, not the official numbers (the shared fixtures do that)."""
    from conftest import self_parity_fixture

    from alignednorm.backbone.clip import ClipBackbone
    from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
    from alignednorm.compat.parity import method_from_manifest

    manifest = json.loads((shared_dir / "reference" / "nemesis_pan_a" / "manifest.json").read_text())
    section = manifest["config"]["TRAINER.CoOpNemesis"]
    if variant == "csc_mixed":
        section.update(N_CTX=8, CSC=True, BETA=0.3, A=10.0, NP=2, CW=0.25, NT="one")
        positions, epoch, epochs = [5, 2], 37, 50
    else:
        section.update(CTX_INIT="a photo of a", CSC=True, BETA=0.0, NP="random2", NT="inf")
        positions, epoch, epochs = [3, 0], 3, 10
    manifest["nemesis"].update(epoch=epoch, max_epoch=epochs, pan={"pos_list": positions})
    manifest["optimizer_step"]["lr_at_step"] = 0.0015
    manifest["class_names"] = [f"shape number {i}" for i in range(5)]
    fixture = tmp_path / variant
    fixture.mkdir()
    (fixture / "manifest.json").write_text(json.dumps(manifest))
    save_openai_state_dict(make_tiny_clip(seed=11, layers=4, width=64, embed_dim=48), fixture / "clip_tiny.safetensors")
    name, config = method_from_manifest(manifest)
    method = create_method(name, ClipBackbone.from_file(fixture / "clip_tiny.safetensors"), config)
    method.set_classnames(manifest["class_names"])
    prompts = [f"{method.context.prompt_prefix} {c}." for c in manifest["class_names"]]
    ours = self_parity_fixture(fixture, manifest, method, prompts, torch.randn(3, 3, 32, 32), torch.tensor([4, 0, 2]))
    assert float(ours["schedule.omega"]) == omega_schedule(epoch, epochs)
    assert ours["pan.inference_logits"].shape == (3, 3, 5) and ours["pan.pos_list"].tolist() == positions
    if variant == "csc_mixed":
        assert ours["after_step.prompt_learner.ctx"].shape == (5, 8, 64) and ours["alpha.pan"].shape == (8,)
        assert float(ours["loss.n_loss_logged"]) == pytest.approx(float(ours["loss.pun"] + ours["loss.pan"]))
        assert float(ours["alpha.pun"][0]) == 10.0
    else:  # word init: a generic 4-token context (the official code ignores CSC then), weighted without selection
        assert ours["after_step.prompt_learner.ctx"].shape == (4, 64)
        assert ours["alpha.pan"].tolist() == [1.0, 0, 0, 1.0]
