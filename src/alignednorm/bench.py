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


# ----------------------------------------------------------------------------------------- the data path
@dataclass
class LoaderTiming:
    """Images per second one pass of a loader delivers with ``workers`` processes (startup included)."""

    workers: int
    train_ips: float
    eval_ips: float


@dataclass
class DataBenchResult:
    geometry: str
    method: str
    device: str
    image_size: tuple[int, int]
    images: int
    batch: int
    default_workers: int
    model_train_ips: float
    model_eval_ips: float
    loaders: list[LoaderTiming] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list:
    """``count`` JPEGs of ``size`` (ImageNet's typical 500×375) with smooth random content, as ``Item``s."""
    import numpy as np
    from PIL import Image

    from alignednorm.data import Item

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    items = []
    for k in range(count):
        path = folder / f"{k:05d}.jpg"
        if not path.is_file():
            coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize(size, Image.BICUBIC).save(path, quality=90)
        items.append(Item(str(path), k % 10, f"class {k % 10}"))
    return items


def time_loader(items, image_size: int, batch: int, workers: int, device: torch.device) -> tuple[float, float]:
    """Images/s of one training pass (planned random-resized crop + flip) and one evaluation pass."""
    from alignednorm.data import ImageListDataset, TrainAugmentation, build_transform
    from alignednorm.engine.batches import EpochBatches, image_batches

    train = ImageListDataset(items, TrainAugmentation(image_size))
    evaluation = ImageListDataset(items, build_transform(image_size, train=False))
    rates = []
    for dataset, sampler in ((train, EpochBatches(len(items), batch, 1, train.plan)), (evaluation, None)):
        start = time.perf_counter()
        loader = image_batches(dataset, workers=workers, device=device, batch_sampler=sampler,
                               batch_size=None if sampler else batch)
        seen = sum(len(b[1]) for b in loader if b is not None)
        rates.append(seen / (time.perf_counter() - start))
    return rates[0], rates[1]


def run_data_bench(geometry: str = "vit-b16", method_name: str = "mmrlpp", workers=(0, 1, 2), images: int = 256,
                   batch: int = 32, device: str = "cpu", classes: int = 50, folder: Path | None = None,
                   image_size: tuple[int, int] = (500, 375)) -> DataBenchResult:
    """Loader images/s for each worker count beside the model's train and eval images/s at ``geometry``."""
    import tempfile

    from alignednorm.engine.batches import default_workers

    dev = resolve_device(device)
    backbone = random_clip(geometry).to(dev)
    with tempfile.TemporaryDirectory() as scratch:
        items = write_jpegs(Path(folder or scratch), images, image_size)
        loaders = [LoaderTiming(w, *time_loader(items, backbone.image_size, batch, w, dev)) for w in workers]
    torch.manual_seed(0)
    method = create_method(method_name, backbone).to(dev)
    model_batch = min(batch, 8) if dev.type == "cpu" else batch  # a CPU step at ViT-B/16 takes seconds per image
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(model_batch, 3, backbone.image_size, backbone.image_size, generator=gen).to(dev)
    labels = (torch.arange(model_batch) % classes).to(dev)
    train_s, _, eval_s, _ = time_configuration(method, pixels, labels, [f"class {i}" for i in range(classes)],
                                               iters=2, clock=make_clock(dev))
    return DataBenchResult(geometry, method_name, str(dev), image_size, images, batch, default_workers(dev),
                           model_batch / train_s, model_batch / eval_s, loaders)


def format_data_result(result: DataBenchResult) -> str:
    """The loader's images/s per worker count beside the model's, and which side waits."""
    w, h = result.image_size
    title = (f"data path: {result.images} JPEGs of {w}x{h} -> {result.geometry} input, batch {result.batch}, "
             f"{result.device}; images per second (loader passes include worker start-up)")
    model = (f"model ({result.method}, {result.geometry}): train {result.model_train_ips:.1f} img/s, "
             f"eval {result.model_eval_ips:.1f} img/s")
    lines = [title, model,
             f"{'workers':>7}  {'train loader':>12}  {'eval loader':>11}  bottleneck (train / eval)"]
    for t in result.loaders:
        train = "loader" if t.train_ips < result.model_train_ips else "model"
        evaluation = "loader" if t.eval_ips < result.model_eval_ips else "model"
        mark = "  <- default here" if t.workers == result.default_workers else ""
        lines.append(f"{t.workers:>7}  {t.train_ips:>12.1f}  {t.eval_ips:>11.1f}  {train} / {evaluation}{mark}")
    return "\n".join(lines)
