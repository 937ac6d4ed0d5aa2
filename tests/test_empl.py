"""EMPL (unofficial reconstruction, specs/empl.md §3) by hand-computed small cases.

Energies and one Langevin step by hand, the number of sampled prompts, K = 0 is CoOp, seeded
determinism at evaluation, and no gradient reaching the parameters during evaluation.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.errors import AlignedNormError, ConfigError
from alignednorm.losses.energy import classifier_energy, conditional_energy, free_energy, gaussian_prior
from alignednorm.methods import create_method, get_method_class, make_config
from alignednorm.prompts.langevin import init_chains, langevin_sample, langevin_step

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=4, layers=2))


def _method(backbone, **config):
    method = create_method("empl", backbone, config)
    method.set_classnames(CLASSES)
    return method.eval()


def _images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- energies (§3.2)
def test_free_energy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    assert torch.allclose(free_energy(logits), torch.tensor([-math.log(4.0), -1.0 - math.log(2.0)]))
    # T = 2: −2 · log(e^0 + e^{ln3 / 2}) = −2 · log(1 + √3)
    assert torch.allclose(free_energy(logits[:1], 2.0), torch.tensor([-2.0 * math.log(1.0 + math.sqrt(3.0))]))


def test_conditional_energy_and_prior_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert torch.equal(conditional_energy(logits, torch.tensor([2, 0])), torch.tensor([-3.0, -4.0]))
    chains = torch.stack([logits, logits + 10], dim=1)  # (B=2, K=2, C=3): the label broadcasts over chains
    assert torch.equal(conditional_energy(chains, torch.tensor([1, 2])), torch.tensor([[-2.0, -12.0], [-6.0, -16.0]]))
    with pytest.raises(ConfigError, match="needs labels"):
        classifier_energy(logits, "conditional")
    with pytest.raises(ConfigError, match="energy = 'joint'"):
        classifier_energy(logits, "joint")
    # (λ/2) ‖(v − v̄)/r‖²: 4 entries of (1/2)² = 1, λ = 2 → 1 per sample; the mean itself costs 0.
    samples = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])
    assert torch.equal(gaussian_prior(samples, torch.zeros(2, 2), weight=2.0, scale=2.0), torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------- Langevin (§3.3)
def test_one_langevin_step_by_hand():
    v, grad, noise = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -2.0]), torch.tensor([1.0, 1.0])
    # v − (η r²/2) ∇E + ν √η r ξ with η = 0.01, r = 2, ν = 0.5: drift 0.02 · ∇E, noise 0.1 · ξ
    out = langevin_step(v, grad, step_size=0.01, noise=noise, scale=2.0, noise_scale=0.5)
    assert torch.allclose(out, torch.tensor([1.02, 2.14]))
    assert torch.allclose(langevin_step(v, grad, 0.01, None, 2.0), torch.tensor([0.92, 2.04]))  # ξ = 0


def test_langevin_sample_matches_the_hand_step_and_records_energies():
    init = torch.tensor([[2.0, -1.0], [0.5, 0.0]])  # two chains of E(v) = ½ ‖v‖², ∇E = v

    def energy(v):
        return 0.5 * v.pow(2).sum(dim=-1)

    result = langevin_sample(energy, init, steps=1, step_size=0.04, scale=0.5,
                             generator=torch.Generator().manual_seed(3))
    xi = torch.randn(2, 2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(result.samples, init - 0.5 * 0.04 * 0.25 * init + 0.2 * 0.5 * xi)
    assert torch.allclose(result.energies, torch.tensor([[2.5, 0.125]]))
    descent = langevin_sample(energy, init, steps=2, step_size=0.04, noise_scale=0.0, scale=0.5)
    assert torch.allclose(descent.samples, init * 0.995**2)  # each step multiplies by 1 − η r²/2
    assert descent.energies.shape == (2, 2) and (descent.energies[1] < descent.energies[0]).all()
    assert langevin_sample(energy, init, steps=0, step_size=0.04).energies.shape == (0, 2)


def test_init_chains_spread():
    mean = torch.ones(2, 3)
    assert torch.equal(init_chains(mean, 4, 0.0), torch.ones(4, 2, 3))
    eps = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(init_chains(mean, 4, 0.1, 2.0, torch.Generator().manual_seed(1)), mean + 0.2 * eps)


# ---------------------------------------------------------------------- the method
def test_marked_unofficial():
    cls = get_method_class("empl")
    assert ("unofficial" in cls.traits.note and "unofficial" in cls.traits.citation
            and "UNOFFICIAL" in sys.modules[cls.__module__].__doc__)
    assert "ICCV" in cls.traits.citation and "2023" in cls.traits.citation


def test_number_of_sampled_prompts(backbone):
    images = _images(3)
    out = _method(backbone, num_samples=3)(images)
    assert out.branches["samples"].shape == (3, 4, 64)  # K chains of the (L, W) context
    assert out.branches["logits_samples"].shape == (3, 4, 3)  # V̄ plus K samples, per image
    assert out.branches["energies"].shape == (2, 3)  # S = 2 steps × K chains
    out = _method(backbone, num_samples=2, include_mean=False, condition="per_image")(images)
    assert out.branches["samples"].shape == (6, 4, 64)  # B · K chains
    assert out.branches["logits_samples"].shape == (3, 2, 3)


def test_k_zero_is_coop_bit_for_bit_and_equal_samples_average_to_it(backbone):
    empl = _method(backbone, num_samples=0)
    coop = create_method("coop", backbone, {"n_ctx": 4, "ctx_init": "a photo of a"})
    with torch.no_grad():
        for m in (empl, coop):
            m.context.ctx.add_(0.05 * torch.randn(4, 64, generator=torch.Generator().manual_seed(2)))
    coop.set_classnames(CLASSES)
    coop.eval()
    images = _images()
    assert torch.equal(empl.predict(images), coop.predict(images))
    # K samples that never move (S = 0, σ₀ = 0) are V̄: the averaged probabilities are CoOp's.
    still = _method(backbone, num_samples=3, langevin_steps=0, init_noise=0.0)
    still.load_learnable_state_dict(empl.learnable_state_dict())
    assert torch.allclose(still.predict(images), F.log_softmax(coop.predict(images), dim=-1), atol=1e-5)
    assert make_config("empl").n_ctx == 4 and empl.context.ctx.numel() == coop.context.ctx.numel()


def test_zero_noise_steps_lower_the_free_energy(backbone):
    method = _method(backbone, num_samples=2, langevin_steps=3, step_size=0.1, noise_scale=0.0, init_noise=0.0,
                     prior_weight=0.0)
    with torch.no_grad():
        out = method(_images())
    energies = out.branches["energies"]  # (S, K), at the start of each step
    assert (energies[1:] < energies[:-1]).all()
    terms = method.sample_terms(out)  # the energy of the final samples continues the descent
    assert terms["energy_end"] < energies[-1].mean() and torch.allclose(terms["energy_start"], energies[0].mean())
    assert torch.allclose(energies[:, 0], energies[:, 1])  # identical starts and no noise: identical chains


def test_evaluation_is_seeded_and_reproducible(backbone):
    images = _images()
    first, second = _method(backbone), _method(backbone)
    assert torch.equal(first.predict(images), first.predict(images))  # the same noise in every call
    assert torch.equal(first.predict(images), second.predict(images))  # and in every instance
    other_seed = _method(backbone, seed=1)
    assert not torch.equal(first(images).branches["samples"], other_seed(images).branches["samples"])
    # ξ = 0: only the seeded start spread differs between chains; with σ₀ = 0 the chains coincide.
    still = _method(backbone, deterministic_eval=True, init_noise=0.0)(images).branches["samples"]
    assert torch.allclose(still[0], still[1], atol=1e-6)


def test_no_gradient_reaches_the_parameters_at_evaluation(backbone):
    method = _method(backbone, first_order=False)
    ctx = method.context.ctx
    logits = method.predict(_images())
    assert ctx.grad is None and not logits.requires_grad
    ctx.grad = torch.full_like(ctx, 7.0)
    with torch.enable_grad():  # even a forward with gradients on: samples are detached at evaluation
        out = method(_images())
    assert not out.branches["samples"].requires_grad
    assert torch.equal(ctx.grad, torch.full_like(ctx, 7.0))
    assert all(p.grad is None for p in backbone.parameters())
    with torch.inference_mode(), pytest.raises(ConfigError, match="not torch.inference_mode"):
        method(_images())


@pytest.mark.parametrize("first_order", [True, False])
def test_training_reaches_the_context_through_the_samples(backbone, first_order):
    method = _method(backbone, first_order=first_order, mean_prompt_weight=0.0, include_mean=False).train()
    labels = torch.tensor([0, 1, 2])
    terms = method.training_step((_images(), labels))
    assert {"loss", "ce", "acc", "sample_norm", "sample_shift", "energy_start", "energy_end"} <= set(terms)
    assert "ce_mean" not in terms  # μ = 0
    terms["loss"].backward()
    assert method.context.ctx.grad is not None and method.context.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_mean_prompt_term(backbone):
    method = _method(backbone, mean_prompt_weight=0.5).train()
    torch.manual_seed(0)
    terms = method.training_step((_images(), torch.tensor([0, 1, 2])))
    assert torch.allclose(terms["loss"].detach(), terms["ce"] + 0.5 * terms["ce_mean"])


@pytest.mark.parametrize(("values", "message"), [
    ({"energy": "joint"}, "energy = 'joint'"),
    ({"condition": "image"}, "condition = 'image'"),
    ({"aggregate": "vote"}, "aggregate = 'vote'"),
    ({"step_size": -1.0}, "step_size = -1.0 is out of range"),
    ({"temperature": 0.0}, "temperature = 0.0 is out of range"),
    ({"class_specific": True}, "class_specific = True"),
    ({"num_samples": 0, "include_mean": False}, "leaves no prompt"),
])
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config("empl", values)
    assert issubclass(ConfigError, AlignedNormError)


def test_preset_is_cheap_on_the_mini_suite_and_cli_shows_the_note():
    from typer.testing import CliRunner

    import alignednorm.mini  # noqa: F401  (registers the mini datasets)
    from alignednorm.cli import app
    from alignednorm.config import resolve_config

    mini = resolve_config("empl", "base2new", "mini_counts").method
    assert (mini.num_samples, mini.langevin_steps) == (2, 1)
    paper = resolve_config("empl", "base2new", "dtd").method
    assert (paper.num_samples, paper.langevin_steps, paper.ctx_init) == (4, 2, "a photo of a")
    listed = CliRunner().invoke(app, ["list", "methods"]).output.splitlines()
    assert "empl  (unofficial reconstruction (no reference code or numbers; specs/empl.md))" in listed
    assert "coop" in listed
