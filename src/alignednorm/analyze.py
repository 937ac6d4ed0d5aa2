"""``alignednorm analyze``: the papers' figures for any trained runs, side by side.

For every run folder it rebuilds the trained method (:func:`alignednorm.engine.run.load_run`),
passes a bounded number of base and new test images of the run's dataset through it with the
backbone's traces on, and hands what it recorded to :mod:`alignednorm.analysis` (compute) and
:mod:`alignednorm.analysis.plots` (figures). Nothing here knows a method: a figure that needs a
quantity a method does not produce (``z_p`` for r(x), vision traces on a ResNet) is skipped with a
one-line reason. Zero-shot CLIP on the same backbone is the reference when asked.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tqdm.auto import tqdm

from alignednorm import data as D
from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.clip_names import resolve_clip_path
from alignednorm.config import to_yaml
from alignednorm.engine.batches import Batches, default_workers, image_batches
from alignednorm.engine.environment import resolve_device
from alignednorm.engine.run import TrainedRun, load_run
from alignednorm.errors import AlignedNormError
from alignednorm.methods import Method, create_method
from alignednorm.protocols.data import dataset_label_space

log = logging.getLogger(__name__)

SUBSETS = (("base", "seen"), ("new", "unseen"))
ATTENTION_LAYERS = 4  # without prompt tokens in the image tower: the last blocks, where the papers look
OVERLAY_IMAGES = 4
PROMPT_NORM_TERM = re.compile(r"^(?:ctx_norm_|prompt_norm\.)(\d+)$")  # per-position prompt norms logged each step


@dataclass
class SubsetRecord:
    """What one pass over one subset's test images recorded (batch statistics already averaged)."""

    features: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    z_p: list[torch.Tensor] = field(default_factory=list)
    z_c: list[torch.Tensor] = field(default_factory=list)
    layer_norms: dict | None = None
    attention: dict | None = None
    overlays: tuple[np.ndarray, np.ndarray] | None = None
    seen: int = 0

    def add_mean(self, name: str, value: dict, weight: int) -> None:
        """Running mean of dicts of arrays (per-layer norms, attention shares) over batches."""
        old = getattr(self, name)
        if old is None:
            setattr(self, name, {k: np.asarray(v, dtype=float) for k, v in value.items()})
            return
        total = self.seen + weight
        for key, arr in value.items():
            if key != "layers":
                old[key] = (old[key] * self.seen + np.asarray(arr, dtype=float) * weight) / total


def _test_items(trained: TrainedRun, classes: str, data_root: str, max_images: int, seed: int) -> D.DatasetSplits:
    split = D.subsample_classes(D.load_splits(trained.info["dataset"], data_root), classes)
    if len(split.test) > max_images:
        keep = np.random.default_rng(seed).choice(len(split.test), max_images, replace=False)
        split.test = [split.test[i] for i in sorted(keep)]
    return split


def _test_batches(images: D.ImageListDataset, batch_size: int, method: Method) -> Batches:
    """The test images in order, loaded with the default workers for the method's device."""
    device = next(method.backbone.parameters()).device
    return image_batches(images, batch_size=batch_size, workers=default_workers(device), device=device)


def _unnormalise(images: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)


@torch.no_grad()
def record_subset(method: Method, split: D.DatasetSplits, dataset: str, rule: str, batch_size: int = 32,
                  progress: bool = True, descriptions: str = "") -> SubsetRecord:
    """One traced pass of ``method`` over ``split.test``: features, branches, norms and attention.

    Attention to prompts (Fig. 3c) covers every layer whose input holds prompt tokens (J..L for deep
    prompts, whatever the method): the first batch traces every vision layer to find them, later
    batches only those and the last layer (its class-token maps are Figs. 6-7).
    """
    from alignednorm.analysis import class_attention_map, layer_norms, prompt_attention_share

    method.eval()
    method.set_label_space(dataset_label_space(dataset, split.classnames, descriptions))
    transform = D.build_transform(method.backbone.image_size, train=False)
    loader = _test_batches(D.ImageListDataset(split.test, transform), batch_size, method)
    backbone, record = method.backbone, SubsetRecord()
    last = backbone.vision_layers
    traced, kept = tuple(range(1, last + 1)), None  # kept: the layers whose attention is averaged
    device = next(backbone.parameters()).device
    for images, labels in tqdm(loader, desc=f"analyze {dataset}/{rule}", disable=None if progress else True,
                               leave=False):
        trace = Traces(image=Trace(attention_layers=traced)) if backbone.is_vit else None
        out = method(images.to(device), rule=rule, trace=trace)
        record.features.append(out.features.cpu())
        record.labels.append(labels)
        for name in ("z_p", "z_c"):
            if name in out.branches:
                getattr(record, name).append(out.branches[name].cpu())
        if trace is not None:
            image = trace.image
            if kept is None:
                kept = _prompted_layers(image.positions, traced) or traced[-ATTENTION_LAYERS:]
                traced = tuple(sorted({*kept, last}))
            record.add_mean("layer_norms", layer_norms(image.hidden, image.positions), len(labels))
            record.add_mean("attention", prompt_attention_share({k: image.attention[k] for k in kept},
                                                                image.positions), len(labels))
            if record.overlays is None:
                maps = class_attention_map(image.attention[last][:OVERLAY_IMAGES], image.positions[last])
                record.overlays = (_unnormalise(images[:OVERLAY_IMAGES]), maps)
        record.seen += len(labels)
    return record


def _prompted_layers(positions: dict[int, tuple[int, int]], layers: tuple[int, ...]) -> tuple[int, ...]:
    """The layers of ``layers`` whose input holds prompt tokens (``positions[layer] = (start, count)``)."""
    return tuple(layer for layer in layers if positions.get(layer, (0, 0))[1] > 0)


def prompt_norms_from_log(run_dir: Path) -> list[np.ndarray]:
    """Per-epoch mean prompt norm per position, from ``log.jsonl`` (the last record of each epoch)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    per_epoch: dict[int, np.ndarray] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        means = entry.get("epoch_mean") if isinstance(entry, dict) else None
        if not isinstance(means, dict):
            continue
        found = {int(m.group(1)): v for k, v in means.items() if (m := PROMPT_NORM_TERM.match(k))}
        if found:
            per_epoch[int(entry["epoch"])] = np.array([found[i] for i in sorted(found)])
    return [per_epoch[e] for e in sorted(per_epoch)]


def epoch_test_accuracy(run_dir: Path) -> dict[int, float]:
    """``{epoch: test accuracy %}`` logged under ``train.eval_test_every_epoch`` (the last record of each epoch)."""
    path = run_dir / "log.jsonl"
    found: dict[int, float] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(entry, dict) and isinstance(entry.get("test_accuracy"), int | float) and "epoch" in entry:
            found[int(entry["epoch"])] = float(entry["test_accuracy"])
    return dict(sorted(found.items()))


def run_label(trained: TrainedRun) -> str:
    """The report's name of the run's method and variant (a ``custom-<hash>`` variant by its ``--set`` /
    ``--config`` settings, see :func:`alignednorm.results.run_label`) and ``/seedS`` from the runner's
    layout; else the method and the folder name (an exported folder)."""
    from alignednorm.results import run_label as report_label
    from alignednorm.results import variant_settings

    method, parts = trained.info["method"], trained.run_dir.resolve().parts
    if len(parts) >= 3 and parts[-1].startswith("seed"):
        return f"{report_label(method, parts[-2], variant_settings(trained.run_dir))}/{parts[-1]}"
    return f"{report_label(method, 'default')}/{trained.run_dir.name}"


@dataclass
class AnalysisOptions:
    """Bounds and switches of one ``analyze`` call.

    Attributes:
        data_root: dataset folder (default: the one each run recorded).
        clip: backbone file when it moved since training (SHA-256 checked).
        max_images: test images per subset (base, new) and run, drawn with ``seed``.
        zeroshot: add zero-shot CLIP on the first run's backbone as the reference.
        tsne: compute the t-SNE figure (the slowest step).
        tsne_points: at most this many points per subset in the t-SNE.
        batch_size: images per traced forward pass.
        seed: draws the image subsets and seeds the t-SNE.
        device: where the methods run.
    """

    data_root: str | None = None
    clip: str | None = None
    max_images: int = 500
    zeroshot: bool = False
    tsne: bool = True
    tsne_points: int = 1000
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def analyze_runs(run_dirs: list[str | Path], output: str | Path, options: AnalysisOptions | None = None) -> Path:
    """Compute, plot and write every figure for ``run_dirs``; returns the HTML page's path."""
    options = options or AnalysisOptions()
    if options.max_images < 2:
        raise AlignedNormError(f"--max-images {options.max_images}: expected at least 2 images per subset")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise AlignedNormError(f"--output {output} is a file; analyze writes a folder (PNGs, numbers, index.html)")
    options.device = str(resolve_device(options.device))
    if options.clip is not None:
        options.clip = str(resolve_clip_path(options.clip))  # 'mini' and the like
    records: dict[str, dict[str, SubsetRecord]] = {}
    configs, skipped, prompt_norms, test_accuracy = {}, {}, {}, {}
    first: TrainedRun | None = None
    for run_dir in run_dirs:
        trained = load_run(run_dir, clip=options.clip, device=options.device)
        first = first or trained
        label = _unique(run_label(trained), records)
        records[label] = _record_run(trained, trained.method, options, skipped, label)
        saved = Path(run_dir) / "config.yaml"  # an exported folder keeps its config in its JSON record
        configs[label] = saved.read_text() if saved.is_file() else to_yaml(trained.config)
        norms = prompt_norms_from_log(Path(run_dir))
        if norms:
            prompt_norms[label] = norms
            test_accuracy[label] = epoch_test_accuracy(Path(run_dir))
    if first is None:
        raise AlignedNormError("no run folders given; pass at least one RUN_DIR")
    if options.zeroshot:
        reference = create_method("zeroshot", first.method.backbone)
        records["zero-shot CLIP"] = _record_run(first, reference, options, skipped, "zero-shot CLIP")
    figures = _figures(records, prompt_norms, output, options, skipped, test_accuracy)
    from alignednorm.analysis import write_report
    from alignednorm.protocols.tables import run_accuracy_table

    # configs: one per run, in order
    accuracy = run_accuracy_table(dict(zip(configs, map(Path, run_dirs), strict=True)))
    return write_report(output / "index.html", figures, configs=configs, skipped=skipped,
                        title=f"alignednorm analysis: {', '.join(records)}", tables=[accuracy] if accuracy else [],
                        runs=run_dirs)


def _unique(label: str, taken) -> str:
    candidate, k = label, 2
    while candidate in taken:
        candidate, k = f"{label} #{k}", k + 1
    return candidate


def _record_run(trained: TrainedRun, method: Method, options: AnalysisOptions, skipped: dict,
                label: str) -> dict[str, SubsetRecord]:
    """Records per subset; a subset a class-specific prompt cannot classify is left out, its reason in ``skipped``."""
    data_root = options.data_root or trained.info.get("data_root")
    if not trained.info.get("dataset"):
        raise AlignedNormError(f"{trained.run_dir}: records no dataset; analyze needs the test images of the dataset "
                               "the prompt was trained on (a training run folder, or an export of one)")
    if not data_root:
        raise AlignedNormError(f"{trained.run_dir}: records no data root; pass --data-root")
    out = {}
    for classes, rule in SUBSETS:
        split = _test_items(trained, classes, str(data_root), options.max_images, options.seed)
        reason = method.serves(split.classnames, rule) if method.traits.class_specific else None
        if reason:
            skipped[f"{classes} classes of {label}"] = reason
            continue
        out[classes] = record_subset(method, split, trained.info["dataset"], rule, options.batch_size,
                                     options.progress, trained.data_config.descriptions)
    return out


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if tensors else torch.empty(0)


def _figures(records, prompt_norms, output: Path, options: AnalysisOptions, skipped: dict,
             test_accuracy: dict | None = None) -> list:
    from alignednorm.analysis import FigureEntry, embedding_geometry, norm_ratio, ratio_summary, tsne_embed

    try:
        from alignednorm.analysis import plots as P
    except ImportError:
        raise AlignedNormError("alignednorm analyze draws with matplotlib: "
                               "pip install 'alignednorm[analysis]'") from None

    output.mkdir(parents=True, exist_ok=True)
    figures = []

    def add(name, title, plot, data, numbers, caption):
        if data:
            figures.append(FigureEntry(name, title, plot(data, output / f"{name}.png"), numbers, caption))

    ratios = {}
    for label, subsets in records.items():
        if not subsets["base"].z_p:
            skipped[f"r(x) of {label}"] = "the method has no prompt branch (no z_p / z_c features)"
            continue
        r = {k: norm_ratio(_cat(s.z_p), _cat(s.z_c)) for k, s in subsets.items()}
        if "new" in r:
            ratios[label] = {**r, "summary": ratio_summary(r["base"], r["new"])}
    few = {label: min(len(v) for k, v in r.items() if k != "summary") for label, r in ratios.items()}
    few = {label: n for label, n in few.items() if n < P.MIN_HISTOGRAM_IMAGES}
    warning = (f" Too few images for a reliable histogram ({', '.join(f'{k}: {n}' for k, n in few.items())} per subset;"
               f" at least {P.MIN_HISTOGRAM_IMAGES} wanted): raise --max-images." if few else "")
    add("norm_ratio", "Norm ratio r(x) = |z_p| / |z_c|, base vs new (Fig. 3a)", P.plot_norm_ratio, ratios,
        {k: v["summary"] for k, v in ratios.items()},
        "A gap between the base and new means lets r(x) tell them apart." + warning)
    vit = {label: s for label, s in records.items() if s["base"].layer_norms is not None}
    for label in set(records) - set(vit):
        skipped[f"norms and attention of {label}"] = "the image tower is not a ViT: no per-layer traces"
    norms = {label: {k: s.layer_norms for k, s in subsets.items()} for label, subsets in vit.items()}
    add("layer_norms", "Per-layer norms of the class token and the prompt tokens (Fig. 3b)", P.plot_layer_norms,
        norms, norms, "Prompt tokens outgrowing the class token layer by layer is the norm imbalance.")
    shares, untraced = {}, {}
    for label, subsets in vit.items():
        share = subsets["base"].attention
        if not any(np.isfinite(np.asarray(share[k], dtype=float)).any() for k in ("cls", "patch")):
            skipped[f"attention to prompts of {label}"] = "no prompt tokens in the image tower: nothing to attend to"
            continue
        shares[label] = share
        norms_of = subsets["base"].layer_norms
        prompted = np.asarray(norms_of["layers"])[np.isfinite(np.asarray(norms_of["prompt_mean"], dtype=float))]
        missing = sorted(set(prompted.astype(int).tolist()) - set(np.asarray(share["layers"]).astype(int).tolist()))
        if missing:
            untraced[label] = missing
    gaps = "".join(f" {k}: prompted layers {', '.join(map(str, v))} were not traced for attention." for k, v in
                   untraced.items())
    add("attention_share", "Attention given to prompt tokens per layer and head (Fig. 3c)", P.plot_attention_share,
        shares, shares, "Share of the class token's and the patches' attention that lands on prompt tokens, per "
        "traced layer (rows) and head (columns)." + gaps)
    if vit:
        images = next(iter(vit.values()))["base"].overlays[0]
        maps = {label: subsets["base"].overlays[1] for label, subsets in vit.items()}
        figures.append(FigureEntry("attention_maps", "Class-token attention of the last layer (Figs. 6-7)",
                                   P.plot_attention_overlays(images, maps, output / "attention_maps.png"),
                                   {"maps": maps}, "Same base test images for every run."))
    geometry = {label: {k: embedding_geometry(_cat(s.features), _cat(s.labels)) for k, s in subsets.items()}
                for label, subsets in records.items()}
    add("uniformity_tolerance", "Uniformity and tolerance of the image embeddings (Eq. 13-14, Fig. 5)",
        P.plot_uniformity_tolerance, geometry, geometry,
        "Uniformity log E exp(-t|f_i - f_j|^2), t = 0.01 (lower: more uniform); tolerance E[f_i . f_j | same class].")
    if options.tsne:
        for label in [label for label, s in records.items() if "new" not in s]:
            skipped[f"t-SNE of {label}"] = "no new-class embeddings (a class-specific prompt)"
        tsne = {label: tsne_embed(_cat(s["base"].features), _cat(s["new"].features), _cat(s["base"].labels),
                                  _cat(s["new"].labels), seed=options.seed, max_points=options.tsne_points)
                for label, s in records.items() if "new" in s}
        add("tsne", "t-SNE of base and new image embeddings (Fig. 4)", P.plot_tsne, tsne,
            {k: {"perplexity": v["perplexity"]} for k, v in tsne.items()}, "Seeded; base and new computed together.")
    accuracy = {k: v for k, v in (test_accuracy or {}).items() if v and k in prompt_norms}
    norm_numbers = {k: {"norm_per_position": np.stack(v), "epoch": np.array(list(accuracy[k])),
                        "test_accuracy": np.array(list(accuracy[k].values()))} if k in accuracy else np.stack(v)
                    for k, v in prompt_norms.items()}
    caption = "Read from each run's log.jsonl."
    if accuracy:
        caption += (" Right: test accuracy per epoch (train.eval_test_every_epoch) beside the mean prompt norm, "
                    "as Nemesis's Fig. 3.")
    add("prompt_norms", "Prompt norm per position over training epochs (Nemesis Figs. 3, A2-A3)",
        lambda data, path: P.plot_prompt_norms_over_epochs(data, path, test_accuracy=accuracy), prompt_norms,
        norm_numbers, caption)
    if not prompt_norms:
        skipped["prompt norms over epochs"] = ("no run logged per-position prompt norms "
                                               "(ctx_norm_<i> terms, as CoOp-style methods do)")
    return figures


def corruption_runs(run_dirs: list[str | Path], options: AnalysisOptions | None = None,
                    output: str | Path | None = None) -> str:
    """Nemesis's corruption experiments on trained CoOp-style prompts: Markdown tables (and JSON when ``output``).

    Each run is evaluated on its own training classes' test images (at most ``max_images``), with
    every context position replaced / rescaled in turn (:mod:`alignednorm.analysis.corruption`).
    """
    from alignednorm.analysis.corruption import corruption_sweep, format_table, low_norm_frequency
    from alignednorm.engine.io import write_json

    options = options or AnalysisOptions()
    parts, numbers = [], {}
    for run_dir in run_dirs:
        trained = load_run(run_dir, clip=options.clip, device=options.device)
        method = trained.method
        if not hasattr(method, "context") or not hasattr(method.context, "n_ctx"):
            raise AlignedNormError(f"{run_dir}: method {trained.info['method']!r} has no CoOp-style text context; "
                                   "the corruption experiments need one (coop, nemesis, cocoop)")
        data_root = options.data_root or trained.info.get("data_root")
        if not data_root:
            raise AlignedNormError(f"{Path(run_dir) / 'run.json'} records no data root; pass --data-root")
        split = _test_items(trained, trained.info.get("train_subset", "all"), str(data_root), options.max_images,
                            options.seed)
        method.set_label_space(dataset_label_space(trained.info["dataset"], split.classnames,
                                                   trained.data_config.descriptions))
        transform = D.build_transform(method.backbone.image_size, train=False)
        loader = _test_batches(D.ImageListDataset(split.test, transform), options.batch_size, method)
        results = corruption_sweep(method, (b for b in loader if b is not None), seed=options.seed)
        label = _unique(run_label(trained), numbers)
        numbers[label] = {"low_norm_frequency": low_norm_frequency(results),
                          "results": [{"operation": r.operation, "factor": r.factor, "baseline": r.baseline,
                                       "accuracy": r.accuracy} for r in results]}
        parts.append(f"### {label} ({len(split.test)} test images of its training classes)\n\n"
                     f"{format_table(results)}\n\n"
                     f"Low-Norm Effect frequency (shrinking RESCALE factors, out of {4 * method.context.n_ctx}): "
                     f"{numbers[label]['low_norm_frequency']}")
    if output is not None:
        write_json(output, numbers)
    return "\n\n".join(parts)
