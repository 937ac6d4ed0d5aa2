"""Seeded t-SNE of base- and new-class embeddings in one shared 2-D map (AlignedNorm Fig. 4).

Both groups are embedded together, so distances between base and new points mean something.
scikit-learn (the ``analysis`` extra) is imported on first use.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np

from alignednorm.analysis._inputs import as_labels, positive
from alignednorm.analysis.uniformity import prepare_embeddings
from alignednorm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GROUPS = ("base", "new")


def tsne_embed(base, new, base_labels=None, new_labels=None, seed: int = 0, perplexity: float = 30.0,
               normalize: bool = True, max_points: int | None = None, max_iter: int = 1000) -> dict[str, np.ndarray]:
    """2-D t-SNE coordinates of base and new embeddings, computed together and seeded.

    Args:
        base: ``(N_base, D)`` embeddings of base-class images.
        new: ``(N_new, D)`` embeddings of new-class images (may have 0 rows).
        base_labels, new_labels: ``(N_base,)``/``(N_new,)`` integer labels, or ``None`` (-1).
        seed: seeds t-SNE and the subsampling.
        perplexity: requested perplexity. scikit-learn needs it below the number of points; when
            it is not, ``(N - 1) / 3`` (at least 1) is used instead, logged and returned.
        normalize: L2-normalise embeddings first (the features the classifier compares).
        max_points: keep at most this many points per group (seeded random subset).
        max_iter: optimisation iterations (scikit-learn's minimum is 250).

    Returns:
        ``coords`` ``(N, 2)``, ``labels`` ``(N,)``, ``group`` ``(N,)`` strings ``"base"``/``"new"``,
        ``index`` ``(N,)`` row of each point within its group, and 0-d arrays ``perplexity``
        (used), ``requested_perplexity`` and ``seed``.
    """
    positive(perplexity, "perplexity")
    if not (isinstance(max_iter, int) and max_iter >= 250):
        raise ConfigError(f"max_iter={max_iter!r}; expected an integer >= 250 (scikit-learn's minimum)")
    if max_points is not None and not (isinstance(max_points, int) and max_points > 0):
        raise ConfigError(f"max_points={max_points!r}; expected a positive integer or None")
    rng = np.random.default_rng(seed)
    parts = [_group(x, y, name, normalize, max_points, rng)
             for x, y, name in ((base, base_labels, "base"), (new, new_labels, "new"))]
    dims = [p[0].shape[1] for p in parts if len(p[0])]
    if len(set(dims)) > 1:
        raise DataError(f"base has dimension {dims[0]} and new {dims[1]}; expected equal embedding dimensions")
    feats = np.concatenate([p[0] for p in parts if len(p[0])] or [np.zeros((0, 1))])
    if feats.shape[0] < 3:
        raise DataError(f"t-SNE got {feats.shape[0]} embeddings in all; expected at least 3")
    used = _perplexity(perplexity, feats.shape[0])
    coords = _run_tsne(feats, used, seed, max_iter)
    return {"coords": coords, "labels": np.concatenate([p[1] for p in parts]),
            "group": np.array([name for name, p in zip(GROUPS, parts, strict=True) for _ in range(len(p[0]))]),
            "index": np.concatenate([p[2] for p in parts]), "perplexity": np.array(used),
            "requested_perplexity": np.array(float(perplexity)), "seed": np.array(seed)}


def _group(x, y, name: str, normalize: bool, max_points: int | None, rng: np.random.Generator) -> tuple:
    """``(features (n, D), labels (n,), row indices (n,))`` of one group, subsampled when asked."""
    f = prepare_embeddings(x, normalize, name).cpu().numpy() if len(x) else np.zeros((0, np.shape(x)[-1]))
    labels = np.full(len(f), -1) if y is None else as_labels(y, f"{name}_labels", len(f)).numpy()
    index = np.arange(len(f))
    if max_points is not None and len(f) > max_points:
        index = np.sort(rng.choice(len(f), size=max_points, replace=False))
    return f[index], labels[index], index


def _perplexity(requested: float, n: int) -> float:
    """The perplexity to use with ``n`` points: the requested one when scikit-learn accepts it."""
    if requested < n:
        return float(requested)
    used = max(1.0, (n - 1) / 3)
    log.warning("t-SNE: perplexity %.4g needs more than %d points; using %.4g instead", requested, n, used)
    return used


def _run_tsne(feats: np.ndarray, perplexity: float, seed: int, max_iter: int) -> np.ndarray:
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ImportError("t-SNE needs scikit-learn: pip install 'alignednorm[analysis]'") from err
    # scikit-learn renamed n_iter to max_iter in 1.5; pass whichever this version knows.
    key = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, **{key: max_iter})
    return tsne.fit_transform(feats.astype(np.float32)).astype(np.float64)  # (N, 2)
