"""One function per figure: each reads numbers from the compute modules and writes a PNG.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: nothing opens a window and the process's global backend is left alone. Inputs keyed by
run name (``{run: ...}``) draw one panel per run, in the mapping's order.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from alignednorm.analysis.norms import prompt_norms_over_epochs
from alignednorm.errors import DataError

SUBSET_COLORS = {"base": "tab:blue", "new": "tab:orange"}
DPI = 110


def _figure(panels: int, width: float = 4.6, height: float = 3.4, cols: int | None = None) -> tuple[Figure, list]:
    cols = cols or min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _nonempty(data: Mapping, name: str) -> Mapping:
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{name} is empty or not a mapping; expected {{run: ...}} with at least one run")
    return data


def _color(subset: str, i: int) -> str:
    return SUBSET_COLORS.get(subset, f"C{i + 2}")


MIN_HISTOGRAM_IMAGES = 30  # below this many images per subset a histogram's shape is mostly noise


def plot_norm_ratio(ratios: Mapping[str, Mapping[str, np.ndarray]], path: str | Path, bins: int = 40) -> Path:
    """Histograms of r(x) on base vs new test images, one panel per run (AlignedNorm Fig. 3a).

    Args:
        ratios: ``{run: {"base": (N_base,), "new": (N_new,)}}`` from :func:`~.norms.norm_ratio`;
            mapping values (e.g. a ``"summary"`` from :func:`~.norms.ratio_summary`) are skipped,
            so the figure's numbers can be passed as they are.
        path: the PNG to write.
        bins: histogram bins, shared by every subset of a panel (fewer when there are few images).

    A panel whose smallest subset has fewer than ``MIN_HISTOGRAM_IMAGES`` images says so in red.
    """
    fig, axes = _figure(len(_nonempty(ratios, "ratios")))
    for ax, (run, subsets) in zip(axes, ratios.items(), strict=True):
        values = {k: np.asarray(v, dtype=float) for k, v in subsets.items() if not isinstance(v, Mapping)}
        if not values or any(v.ndim != 1 or v.size == 0 for v in values.values()):
            raise DataError(f"ratios[{run!r}] has no non-empty 1-D arrays; expected {{'base': (N,), 'new': (N,)}}")
        fewest = min(v.size for v in values.values())
        edges = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=min(bins, max(5, fewest)))
        for i, (subset, v) in enumerate(values.items()):
            ax.hist(v, bins=edges, alpha=0.55, density=True, color=_color(subset, i),
                    label=f"{subset} (mean {v.mean():.3f})")
            ax.axvline(v.mean(), color=_color(subset, i), linestyle="--", linewidth=1)
        gap = f", gap {values['base'].mean() - values['new'].mean():+.3f}" if {"base", "new"} <= set(values) else ""
        ax.set_title(f"{run}{gap}", fontsize=9, wrap=True)
        ax.set(xlabel="r(x) = ||z_p|| / ||z_c||", ylabel="density")
        if fewest < MIN_HISTOGRAM_IMAGES:
            ax.text(0.02, 0.97, f"only {fewest} images in a subset:\nthe histogram's shape is unreliable",
                    transform=ax.transAxes, va="top", fontsize=7, color="tab:red")
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_layer_norms(norms: Mapping[str, Mapping[str, Mapping]], path: str | Path) -> Path:
    """Per-layer norms of the class token and the prompt tokens (AlignedNorm Fig. 3b).

    Args:
        norms: ``{run: {subset: layer_norms(...)}}``; each value holds ``layers``, ``cls``,
            ``prompt_mean`` and ``prompt_tokens`` (see :func:`~.norms.layer_norms`).
        path: the PNG to write.

    Solid lines are the class token, dashed the mean prompt-token norm, thin lines single tokens.
    """
    fig, axes = _figure(len(_nonempty(norms, "norms")))
    for ax, (run, subsets) in zip(axes, norms.items(), strict=True):
        for i, (subset, n) in enumerate(subsets.items()):
            layers, color = np.asarray(n["layers"]), _color(subset, i)
            ax.plot(layers, n["cls"], "-o", color=color, markersize=3, label=f"class token ({subset})")
            ax.plot(layers, n["prompt_mean"], "--s", color=color, markersize=3, label=f"prompt mean ({subset})")
            tokens = np.asarray(n.get("prompt_tokens", np.zeros((len(layers), 0))), dtype=float)
            for k in range(tokens.shape[1]):
                ax.plot(layers, tokens[:, k], "-", color=color, alpha=0.25, linewidth=0.8)
        ax.set(title=run, xlabel="layer", ylabel="token norm")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_attention_share(shares: Mapping[str, Mapping[str, np.ndarray]], path: str | Path) -> Path:
    """Heatmaps (layer x head) of the attention share given to prompt tokens (AlignedNorm Fig. 3c).

    Args:
        shares: ``{run: prompt_attention_share(...)}`` with ``layers``, ``cls`` and ``patch``
            ``(L, heads)`` and ``uniform`` ``(L,)``; every layer given is drawn, ticked by its number.
        path: the PNG to write.

    Each run is one row of two panels (queries from the class token, from the patch tokens) under the
    run's name; runs without prompt tokens (all NaN) belong in the page's skipped list, not here.
    """
    runs = _nonempty(shares, "shares")
    fig = Figure(figsize=(9.0, len(runs) * (0.32 * _max_layers(runs) + 1.9)), layout="constrained")
    FigureCanvasAgg(fig)
    for row, (run, s) in zip(fig.subfigures(len(runs), 1, squeeze=False).ravel(), runs.items(), strict=True):
        row.suptitle(run, fontsize=10, fontweight="bold")
        layers = np.asarray(s["layers"]).astype(int)
        for ax, key in zip(row.subplots(1, 2), ("cls", "patch"), strict=True):
            values = np.asarray(s[key], dtype=float)  # (L, heads)
            top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
            image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(top, 1e-6))
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            ax.set_xticks(_int_ticks(values.shape[1]), [str(h + 1) for h in _int_ticks(values.shape[1])])
            ax.set_title("class token → prompts" if key == "cls" else "patch tokens → prompts", fontsize=9)
            ax.set(xlabel="head", ylabel="layer")
            row.colorbar(image, ax=ax, shrink=0.85, label="share")
    return _save(fig, path)


def _int_ticks(count: int, most: int = 12) -> list[int]:
    """Tick positions 0..count-1, thinned to at most ``most`` labels."""
    return list(range(0, count, max(1, math.ceil(count / most))))


def _max_layers(shares: Mapping) -> int:
    return max(len(np.asarray(s["layers"])) for s in shares.values())


def plot_attention_overlays(images: np.ndarray, maps: np.ndarray | Mapping[str, np.ndarray], path: str | Path,
                            titles: Sequence[str] | None = None, alpha: float = 0.5) -> Path:
    """Class-token attention maps laid over their images (AlignedNorm Figs. 6-7).

    Args:
        images: ``(K, H, W, 3)`` or ``(K, H, W)`` images, floats in [0, 1] or uint8.
        maps: ``(K, grid, grid)`` maps from :func:`~.attention.class_attention_map`, or
            ``{row name: (K, grid, grid)}`` for one row per run or layer.
        path: the PNG to write.
        titles: one title per image (column).
        alpha: opacity of the map over the image.

    Each map is rescaled to [0, 1] per image for display; the numbers keep the probabilities.
    """
    rows = dict(maps) if isinstance(maps, Mapping) else {"": maps}
    imgs = np.asarray(images)
    if imgs.ndim not in (3, 4) or any(np.asarray(m).shape[0] != imgs.shape[0] for m in rows.values()):
        raise DataError(f"images has shape {imgs.shape}; expected (K, H, W[, 3]) with one map per image")
    k = imgs.shape[0]
    fig, axes = _figure(len(rows) * k, width=2.4, height=2.6, cols=k)
    for r, (name, m) in enumerate(rows.items()):
        for j in range(k):
            ax, img = axes[r * k + j], imgs[j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.imshow(_unit(np.asarray(m[j], dtype=float)), cmap="jet", alpha=alpha, interpolation="bilinear",
                      extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
            label = titles[j] if titles is not None and j < len(titles) else f"image {j}"
            ax.set_title(f"{name}: {label}" if name else label, fontsize=8)
            ax.axis("off")
    return _save(fig, path)


def _unit(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def plot_uniformity_tolerance(values: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path) -> Path:
    """Bar charts of uniformity and tolerance per run and subset (AlignedNorm Fig. 5).

    Args:
        values: ``{run: {subset: embedding_geometry(...)}}``, e.g. runs ``zero-shot``, ``MMRL++``,
            ``AlignedNorm`` and subsets ``base``/``new``; each holds ``uniformity``, ``tolerance``.
        path: the PNG to write.
    """
    runs = list(_nonempty(values, "values"))
    subsets = list(dict.fromkeys(s for r in runs for s in values[r]))
    fig, axes = _figure(2, width=max(4.0, 0.6 * len(runs) * max(1, len(subsets)) + 2.0))
    width = 0.8 / max(1, len(subsets))
    for ax, metric in zip(axes, ("uniformity", "tolerance"), strict=True):
        for i, subset in enumerate(subsets):
            heights = [values[r].get(subset, {}).get(metric, np.nan) for r in runs]
            bars = ax.bar(np.arange(len(runs)) + (i - (len(subsets) - 1) / 2) * width, heights, width,
                          color=_color(subset, i), label=subset)
            ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_xticks(range(len(runs)), runs, rotation=20, ha="right")
        ax.axhline(0.0, color="black", linewidth=0.6)
        if metric == "uniformity":
            _zoom(ax, [values[r][s][metric] for r in runs for s in values[r] if metric in values[r][s]])
        ax.set(title=metric + (" (lower = more uniform; axis zoomed)" if metric == "uniformity"
                               else " (same-class cosine)"))
        ax.legend(fontsize=8)
    return _save(fig, path)


def _zoom(ax, values: list[float]) -> None:
    """Limit the y axis to the data: with t = 0.01 uniformities differ in the third decimal."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size:
        pad = 0.25 * (v.max() - v.min()) or 0.05 * abs(v.max()) or 1e-3
        ax.set_ylim(v.min() - pad, v.max() + pad)


TSNE_PALETTES = {"base": "Blues", "new": "Oranges"}  # base classes in blues, new classes in oranges


def plot_tsne(results: Mapping[str, Mapping[str, np.ndarray]], path: str | Path) -> Path:
    """t-SNE scatter of base (blue circles) and new (orange triangles) embeddings (Fig. 4).

    Args:
        results: ``{run: tsne_embed(...)}`` with ``coords`` ``(N, 2)``, ``labels`` ``(N,)`` and
            ``group`` ``(N,)``.
        path: the PNG to write.

    Base and new classes never share a colour: each group has its own palette (shades tell its classes
    apart) and marker, so new class ``i`` is not drawn like base class ``i``.
    """
    fig, axes = _figure(len(_nonempty(results, "results")), width=4.6, height=4.4)
    for ax, (run, res) in zip(axes, results.items(), strict=True):
        coords, labels, group = (np.asarray(res[k]) for k in ("coords", "labels", "group"))
        for name, marker in (("base", "o"), ("new", "^")):
            sel = group == name
            if sel.any():
                classes = np.unique(labels[sel])
                shade = np.searchsorted(classes, labels[sel]) / max(1, len(classes) - 1)
                cmap = colormaps[TSNE_PALETTES[name]]
                ax.scatter(coords[sel, 0], coords[sel, 1], c=cmap(0.35 + 0.6 * shade), marker=marker, s=12,
                           alpha=0.85, edgecolors="none")
                ax.plot([], [], marker, color=cmap(0.8), linestyle="none",
                        label=f"{name}: {len(classes)} classes, {int(sel.sum())} images")
        ax.set_title(f"{run}\n(perplexity {float(res.get('perplexity', np.nan)):.3g})", fontsize=9)
        ax.set(xticks=[], yticks=[])
        ax.legend(fontsize=7, title="shade = class", title_fontsize=7)
    return _save(fig, path)


def plot_prompt_norms_over_epochs(per_epoch: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]],
                                  path: str | Path, epochs: Sequence[int] | None = None,
                                  test_accuracy: Mapping[str, Mapping[int, float]] | None = None) -> Path:
    """Soft-prompt norm per position over training (Nemesis Figs. A2-A3), one line per position.

    With ``test_accuracy``, each run's row gets a second panel as Nemesis's Fig. 3: the test accuracy over
    epochs (left axis) beside the mean norm of all prompt vectors (right axis).

    Args:
        per_epoch: one array per epoch, ``(n_ctx,)`` or ``(C, n_ctx)`` from
            :func:`~.norms.prompt_vector_norms` (a leading class/prompt-set axis is averaged), or
            ``{run: [...]}`` for one panel per run.
        path: the PNG to write.
        epochs: the epoch of each array; 1, 2, ... when ``None``.
        test_accuracy: ``{run: {epoch: accuracy %}}`` (``""`` names the run of a plain ``per_epoch``); runs
            left out get a panel saying so.
    """
    runs = dict(per_epoch) if isinstance(per_epoch, Mapping) else {"": per_epoch}
    accuracy = dict(test_accuracy or {})
    if accuracy.keys() - runs.keys():
        raise DataError(f"test_accuracy names runs without prompt norms: {sorted(accuracy.keys() - runs.keys())}")
    paired = any(accuracy.values())
    panels = len(_nonempty(runs, "per_epoch")) * (2 if paired else 1)
    fig, axes = _figure(panels, cols=2 if paired else None)
    for i, (run, arrays) in enumerate(runs.items()):
        ax = axes[2 * i if paired else i]
        table = prompt_norms_over_epochs(arrays)  # (E, n_ctx)
        xs = np.arange(1, len(table) + 1) if epochs is None else np.asarray(epochs)
        if len(xs) != len(table):
            raise DataError(f"epochs has {len(xs)} entries but {run or 'per_epoch'} has {len(table)}; expected equal")
        positions = table.shape[1]
        norm = Normalize(vmin=1, vmax=max(2, positions))
        for j in range(positions):
            ax.plot(xs, table[:, j], color=colormaps["viridis"](norm(j + 1)), linewidth=1.2)
        ax.set(xlabel="epoch", ylabel="norm")
        ax.set_title(textwrap.fill(run, 48) if run else "prompt norm per position", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="position")
        if paired:
            _accuracy_panel(axes[2 * i + 1], accuracy.get(run) or {}, xs, table.mean(axis=1))
    return _save(fig, path)


def _accuracy_panel(ax, accuracy: Mapping[int, float], xs: np.ndarray, mean_norm: np.ndarray) -> None:
    """Nemesis Fig. 3 for the run of its row: test accuracy per epoch, and the mean prompt norm on a second axis."""
    ax.set_xlabel("epoch")
    ax.set_title("test accuracy and mean prompt norm", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not accuracy:
        ax.text(0.5, 0.5, "no per-epoch test accuracy logged\n(train.eval_test_every_epoch)", ha="center",
                va="center", transform=ax.transAxes, fontsize=8)
        ax.set(xticks=[], yticks=[])
        return
    ticks = sorted(accuracy)
    ax.plot(ticks, [accuracy[e] for e in ticks], color="black", marker="o", markersize=3, label="test accuracy")
    ax.set_ylabel("test accuracy (%)")
    twin = ax.twinx()
    twin.plot(xs, mean_norm, color="tab:red", linestyle="--", linewidth=1.2, label="mean prompt norm")
    twin.set_ylabel("mean prompt norm", color="tab:red")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower right")


def plot_dataset_bars(values: Mapping, path: str | Path) -> Path:
    """Per-dataset grouped bars of Base, New and HM accuracy per method, with the paper's as black ticks.

    Args:
        values: ``{"datasets": [...], "ours": {method: {"Base"|"New"|"HM": [value or None per dataset]}},
            "paper": {method: {...}}}`` (:func:`alignednorm.protocols.tables.per_dataset_values`).
        path: the PNG to write.
    """
    datasets, ours, paper = list(values["datasets"]), _nonempty(values["ours"], "ours"), values.get("paper") or {}
    width, paper_shown = 0.8 / len(ours), False
    fig, axes = _figure(3, width=max(6.0, 0.55 * len(datasets) * len(ours) + 2.5), height=2.9, cols=1)
    for ax, key in zip(axes, ("Base", "New", "HM"), strict=True):
        for i, (label, keys) in enumerate(ours.items()):
            xs = np.arange(len(datasets)) + (i - (len(ours) - 1) / 2) * width
            heights = np.array([np.nan if v is None else v for v in keys[key]], dtype=float)
            bars = ax.bar(xs, np.nan_to_num(heights), width, color=f"C{i}", label=label if key == "Base" else None)
            ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.1f}" for h in heights], fontsize=6)
            published = [np.nan if v is None else v for v in (paper.get(label) or {}).get(key, [])]
            if np.isfinite(np.asarray(published, dtype=float)).any():
                ax.scatter(xs, published, marker="_", s=180, color="black", zorder=3,
                           label=None if paper_shown else "paper")
                paper_shown = True
        ax.set_xticks(range(len(datasets)), datasets, rotation=20, ha="right", fontsize=8)
        ax.set(ylabel=f"{key} accuracy (%)", ylim=(0, 105))
    longest = max(len(label) for label in ours)
    fig.legend(loc="outside upper center", ncols=max(1, min(len(ours) + 1, 90 // (longest + 6))), fontsize=8)
    return _save(fig, path)
