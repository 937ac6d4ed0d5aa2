"""``alignednorm bench``: what a training step and an evaluation batch cost, with each optimisation on and off.

Builds a CLIP of a named geometry with random weights (or loads a given checkpoint), then for each
class count times, in one process and alternating, the method's training step (forward, backward,
optimiser step), the first evaluation batch (text features encoded) and a steady evaluation batch
(text features cached), with each backbone optimisation off and on. Tests compare numbers, never
timings: timings are what this command prints.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.engine.environment import resolve_device
from alignednorm.errors import ConfigError
from alignednorm.methods import StepState, create_method, list_methods

# name: (vision layers, vision width, patch, image size, text width, text heads, text layers, embed dim)
GEOMETRIES = {
    "vit-b16": (12, 768, 16, 224, 512, 8, 12, 512),
    "vit-b32": (12, 768, 32, 224, 512, 8, 12, 512),
    "vit-l14": (24, 1024, 14, 224, 768, 12, 12, 768),
    "tiny": (12, 64, 16, 32, 64, 1, 12, 32),
}
# Backbone switches that change speed and memory, never numbers.
OPTIMISATIONS = ("cut_text_padding", "share_text_prefix")


def random_clip(geometry: str, seed: int = 0) -> ClipBackbone:
    """A CLIP of ``geometry`` with random weights in OpenAI's layout (QuickGELU)."""
    if geometry not in GEOMETRIES:
        raise ConfigError(f"--geometry {geometry!r}; expected one of {', '.join(GEOMETRIES)}")
    v_layers, v_width, patch, size, t_width, t_heads, t_layers, embed = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    model = CLIP(embed, CLIPVisionCfg(layers=v_layers, width=v_width, patch_size=patch, image_size=size,
                                      head_width=min(64, v_width)),
                 CLIPTextCfg(context_length=77, width=t_width, heads=t_heads, layers=t_layers), quick_gelu=True)
    return ClipBackbone(model.eval(), source=f"random {geometry}")


def learnable_parameter_counts(backbone: ClipBackbone) -> dict[str, int]:
    """Learnable parameters of every registered method with its default config on ``backbone``."""
    counts = {}
    for name in list_methods():
        try:
            method = create_method(name, backbone)
        except ConfigError:  # e.g. a vision-prompt method on a ResNet tower: not applicable
            counts[name] = -1
            continue
        counts[name] = sum(p.numel() for p in method.learnable_parameters())
    return counts


@dataclass
class Timing:
    """Seconds per iteration (median over ``iters``) of one configuration."""

    classes: int
    settings: dict
    train_s: float
    eval_first_s: float
    eval_steady_s: float
    max_rss_mb: float
    cuda_peak_mb: float | None = None
    logits_max_diff: float = 0.0


@dataclass
class BenchResult:
    method: str
    geometry: str
    batch: int
    device: str
    clock: str = "wall"
    params: dict[str, int] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


CLOCKS = ("wall", "cpu")


def make_clock(device: torch.device, kind: str = "wall"):
    """Seconds now: wall time (GPU work synchronised first) or this process's CPU time (``cpu``: robust
    on a busy machine, counts every thread's work)."""
    if kind not in CLOCKS:
        raise ConfigError(f"--clock {kind!r}; expected one of {', '.join(CLOCKS)}")

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.process_time() if kind == "cpu" else time.perf_counter()

    return clock


def time_configuration(method, images, labels, classnames, iters: int, clock=time.perf_counter
                       ) -> tuple[float, float, float, torch.Tensor]:
    """Median train-step, first-eval and steady-eval seconds, and the eval logits."""
    optimizer = torch.optim.AdamW(method.learnable_parameters(), lr=1e-6) if method.learnable_parameters() else None
    train, first, steady = [], [], []
    for _ in range(iters):
        method.set_classnames(classnames)
        if optimizer is not None:
            method.train()
            start = clock()
            method.training_step((images, labels), StepState())["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train.append(clock() - start)
        method.eval()
        method.set_classnames(classnames)  # drops the text cache: the first batch encodes the classes
        with torch.no_grad():
            start = clock()
            logits = method.predict(images)
            first.append(clock() - start)
            start = clock()
            method.predict(images)
            steady.append(clock() - start)
    return (_median(train) if train else float("nan")), _median(first), _median(steady), logits


SELECTIONS = ("each", "off", "on")


def optimisation_settings(selection: str = "each") -> list[dict[str, bool]]:
    """``each``: every optimisation off, then each switched on in turn, keeping the earlier ones on;
    ``off`` / ``on``: only the first / last of those (peak memory is per process: time one per process)."""
    if selection not in SELECTIONS:
        raise ConfigError(f"--settings {selection!r}; expected one of {', '.join(SELECTIONS)}")
    every = [{name: i < on for i, name in enumerate(OPTIMISATIONS)} for on in range(len(OPTIMISATIONS) + 1)]
    return {"each": every, "off": every[:1], "on": every[-1:]}[selection]


def run_bench(method_name: str, geometry: str = "vit-b16", classes=(50,), batch: int = 8, iters: int = 2,
              device: str = "cpu", backbone: ClipBackbone | None = None, clock: str = "wall",
              settings: str = "each") -> BenchResult:
    """Time ``method_name`` under :func:`optimisation_settings` per class count (one process, in turn)."""
    dev = resolve_device(device)
    timer = make_clock(dev, clock)
    label = geometry if backbone is None else Path(backbone.source or "given backbone").name
    backbone = (backbone or random_clip(geometry)).to(dev)
    result = BenchResult(method_name, label, batch, device, clock, learnable_parameter_counts(backbone))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=gen).to(dev)
    for n_classes in classes:
        labels = (torch.arange(batch) % n_classes).to(dev)
        classnames = [f"class {i}" for i in range(n_classes)]
        reference = None
        for chosen in optimisation_settings(settings):
            torch.manual_seed(0)
            method = create_method(method_name, backbone).to(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with backbone.text_options(**chosen):
                train_s, first_s, steady_s, logits = time_configuration(method, images, labels, classnames, iters,
                                                                        timer)
            diff = 0.0 if reference is None else float((logits - reference).abs().max())
            reference = logits if reference is None else reference
            result.timings.append(Timing(
                n_classes, dict(chosen), train_s, first_s, steady_s,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None, diff))
    return result


def _setting_label(settings: dict[str, bool]) -> str:
    on = [name for name, enabled in settings.items() if enabled]
    if not on:
        return "none"
    return "+" + on[-1]


def format_result(result: BenchResult) -> str:
    """A plain-text table: s/iter and peak memory per configuration, the speed-up over "none" per class count."""
    title = (f"{result.method} on {result.geometry} ({result.device}, batch {result.batch}): {result.clock} seconds "
             "per iteration; each row adds one optimisation to the row above; peak memory so far in this process")
    header = (f"{'classes':>7}  {'optimisation':<20} {'train':>9} {'eval 1st':>9} {'eval':>9} {'peak MB':>8}"
              f" {'max |dlogit|':>12}  {'speed-up train / eval 1st / eval':>32}")
    lines = [title, header]
    baseline: dict[int, Timing] = {}
    for t in result.timings:
        if not any(t.settings.values()):
            baseline[t.classes] = t
        base = baseline.get(t.classes)
        ratios = "-" if base is None else " / ".join(
            f"{a / b:.2f}x" for a, b in ((base.train_s, t.train_s), (base.eval_first_s, t.eval_first_s),
                                         (base.eval_steady_s, t.eval_steady_s)))
        peak = t.cuda_peak_mb if t.cuda_peak_mb is not None else t.max_rss_mb
        lines.append(f"{t.classes:>7}  {_setting_label(t.settings):<20} {t.train_s:>9.3f} {t.eval_first_s:>9.3f}"
                     f" {t.eval_steady_s:>9.3f} {peak:>8.0f} {t.logits_max_diff:>12.2e}  {ratios:>32}")
    lines.append("learnable parameters at this geometry (default configs): " +
                 ", ".join(f"{k} {v / 1e6:.3f} M" if v >= 0 else f"{k} n/a" for k, v in result.params.items()))
    return "\n".join(lines)
