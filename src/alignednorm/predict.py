"""Use a trained prompt: ``alignednorm.load(run_dir).predict(images, classes)``.

A run folder holds everything needed: ``run.json`` (method, backbone file and SHA-256, class
names, template), ``config.yaml`` and ``learnable.safetensors``. The inference rule follows the
classes asked about: ``seen`` when they are all among the training classes (MMRL++: fused logits),
``unseen`` otherwise (MMRL++: the class branch, as its official code does for new classes);
unified methods use one rule for both.

A folder written by ``alignednorm export`` names its backbone by file name and SHA-256 only (no
path of the machine that exported it): :func:`load` finds the file by that name in the folder, the
folder above it or the current folder (the SHA-256 must match), or takes ``clip=``.

:func:`train` is the Python entry point of ``alignednorm train``: same run folder, same reuse rule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from alignednorm import data as D
from alignednorm.data.dataset import load_rgb, to_rgb
from alignednorm.engine.run import TrainedRun, load_run
from alignednorm.errors import CheckpointError, ConfigError, DataError
from alignednorm.methods import check_rule
from alignednorm.prompts.label_space import LabelSpace

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Predictor:
    """A trained method ready to classify images among any class names.

    Besides :meth:`predict`, it offers what open_clip users call: :meth:`encode_image` and
    :meth:`encode_text` (the class embeddings with the learned prompts) and :meth:`logits`.
    ``images`` may be image paths, a folder, PIL images, or a ``(B, 3, H, W)`` tensor already
    transformed (:attr:`transform`).
    """

    def __init__(self, trained: TrainedRun):
        self.method = trained.method.eval()
        self.info = trained.info
        self.run_dir = trained.run_dir
        self.metrics: dict = {}  # filled by train(): {dataset: the evaluation's metrics}
        self.transform = D.build_transform(self.method.backbone.image_size, train=False)

    def __repr__(self) -> str:
        names = self.classnames
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        trained = f"{self.info.get('dataset') or '?'}"
        if self.info.get("shots") is not None:
            trained += f", {self.info['shots']} shots"
        backbone = Path(str(self.info.get("clip") or "?")).name
        backbone += f" ({self.info['clip_model']})" if self.info.get("clip_model") else ""
        return (f"Predictor(method={self.info['method']!r}, backbone={backbone!r}, trained_on={trained!r}, "
                f"classes={len(names)} [{shown}], learnable_parameters={self.learnable_parameters:,}, "
                f"device={self.device}, folder={str(self.run_dir)!r})")

    @property
    def classnames(self) -> list[str]:
        return self.info["classnames"]

    @property
    def device(self) -> torch.device:
        return next(self.method.backbone.parameters()).device

    @property
    def learnable_parameters(self) -> int:
        return sum(p.numel() for p in self.method.learnable_parameters())

    def _space(self, classes: Sequence[str] | None, template: str | None, rule: str | None) -> tuple[list[str], str]:
        """Set the label space to ``classes`` (default: the training classes); returns them and the rule."""
        classes = self.classnames if classes is None else list(classes)
        if not classes:
            raise ConfigError("no class names given; pass at least one class (or none at all for the run's own)")
        rule = check_rule(rule or self.rule_for(classes))
        self.method.check_classnames(classes, rule)
        self.method.set_label_space(LabelSpace(tuple(classes), (template or self.info["template"],)))
        return classes, rule

    def _batch(self, images) -> torch.Tensor:
        batch = images if isinstance(images, torch.Tensor) else torch.stack([self.transform(i) for i in _open(images)])
        return batch.to(self.device)

    @torch.no_grad()
    def encode_image(self, images, classes: Sequence[str] | None = None, rule: str | None = None) -> torch.Tensor:
        """Image embeddings ``(B, E)``, L2-normalised: the feature the inference rule classifies (with
        deep prompts it depends on the prompts, and for MMRL++ on the rule; ``classes`` picks the rule)."""
        classes, rule = self._space(classes, None, rule)
        return self.method(self._batch(images), rule=rule).features

    @torch.no_grad()
    def encode_text(self, classes: Sequence[str] | None = None, template: str | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Class embeddings ``(C, E)`` with the learned prompts (default: the training classes)."""
        self._space(classes, template, "any" if classes is not None else None)
        features = self.method.text_features()
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def logits(self, images, classes: Sequence[str] | None = None, template: str | None = None,
               rule: str | None = None) -> torch.Tensor:
        """Logits ``(B, C)`` of the inference rule (default: chosen from ``classes``, see the module)."""
        classes, rule = self._space(classes, template, rule)
        return self.method.predict(self._batch(images), rule=rule)

    def rule_for(self, classes: list[str]) -> str:
        """``seen`` when every class was trained on (or nothing was trained), else ``unseen``."""
        trained = self.method.trained_classnames
        return "seen" if trained is None or set(classes) <= set(trained) else "unseen"

    @torch.no_grad()
    def predict(self, images, classes: list[str] | None = None, topk: int | None = None, template: str | None = None,
                rule: str | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(class name, probability)`` per image.

        Args:
            images: image paths, a folder, PIL images, or a ``(B, 3, H, W)`` normalised tensor.
            classes: class names to choose from (default: the run's training classes).
            topk: how many labels per image (default: 5, or all classes when fewer; at least 1; more than
                the classes is clamped, with a warning).
            template: prompt template (default: the run's).
            rule: inference rule ``seen`` / ``unseen`` / ``any``; default: chosen from ``classes`` (see module).
        """
        classes = self.classnames if classes is None else list(classes)
        topk = min(5, len(classes) or 1) if topk is None else topk
        if not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk = {topk!r}; expected an integer >= 1")
        if classes and topk > len(classes):
            log.warning("topk = %d is more than the %d classes; showing all %d", topk, len(classes), len(classes))
        probs = self.logits(images, classes, template, rule).softmax(dim=-1)
        values, indices = probs.topk(min(topk, len(classes)), dim=-1)
        return [[(classes[i], float(v)) for v, i in zip(row_v, row_i)] for row_v, row_i in zip(values, indices)]


def image_paths(inputs) -> list[Path]:
    """Expand folders into their image files (sorted); keep files as given."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"image {path} does not exist")
    if not paths:
        raise DataError(f"no images found in {[str(i) for i in inputs]}")
    return paths


def _open(images) -> list[Image.Image]:
    if isinstance(images, (str, Path)):
        images = [images]
    if all(isinstance(i, Image.Image) for i in images):
        return [to_rgb(i, f"image {k}") for k, i in enumerate(images)]
    return [open_image(p) for p in image_paths(images)]


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB, or a one-line :class:`DataError` naming it (not an image, truncated, ...)."""
    try:
        return load_rgb(str(path))
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def open_images(paths: list[Path]) -> tuple[list[Path], list[Image.Image], dict[Path, str]]:
    """The readable images of ``paths`` and, for the others, why they were skipped."""
    kept, images, skipped = [], [], {}
    for path in paths:
        try:
            images.append(open_image(path))
            kept.append(path)
        except DataError as exc:
            skipped[path] = str(exc)
    return kept, images, skipped


def load(run_dir: str | Path, clip: str | Path | None = None, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild the method of a finished run folder or an exported folder.

    Args:
        run_dir: a run folder written by ``alignednorm train`` / ``run``, or a folder written by
            ``alignednorm export``.
        clip: the backbone checkpoint, when it moved since training (its SHA-256 must match). An
            exported folder names its backbone only: without ``clip``, the file of that name is
            looked for in the folder, the folder above it and the current folder.
        device: where to run.

    Example:
        >>> model = alignednorm.load("eurosat-alignednorm", clip="ViT-B-16.pt")  # doctest: +SKIP
        >>> model.predict(["a.jpg"], classes=["forest", "river"])  # doctest: +SKIP
    """
    from alignednorm.clip_names import resolve_clip_path

    if clip is None:
        clip = exported_backbone(Path(run_dir))
    return Predictor(load_run(run_dir, clip=resolve_clip_path(clip) if clip is not None else None, device=device))


def exported_backbone(folder: Path) -> Path | None:
    """The backbone file of an exported ``folder`` found by its recorded name and SHA-256.

    ``None`` for a run folder, or when the record holds a path that exists (an older export: the
    loader checks it); a one-line :class:`CheckpointError` saying to pass ``clip=`` otherwise.
    """
    from alignednorm.engine.io import file_sha256
    from alignednorm.engine.run import EXPORT_CONFIG, read_exported

    if not (folder / EXPORT_CONFIG).is_file():
        return None
    info, _ = read_exported(folder)
    recorded = Path(str(info["clip"]))
    if recorded.is_absolute() and recorded.is_file():
        return None
    if str(info["clip"]) == "mini":
        from alignednorm.mini import mini_clip_path

        return mini_clip_path()
    places = list(dict.fromkeys([folder, folder.parent, Path.cwd()]))
    for place in places:
        candidate = place / recorded.name
        if candidate.is_file() and file_sha256(candidate) == info["clip_sha256"]:
            return candidate
    raise CheckpointError(f"{folder} names its backbone {recorded.name!r} (SHA-256 {info['clip_sha256'][:12]}...) "
                          f"without a path, and no file of that name and checksum is in "
                          f"{', '.join(str(p) for p in places)}: pass clip=PATH (Python) or --clip PATH")


def train(method: str, dataset: str, data_root: str | Path | None = None, clip: str | Path | None = None,
          clip_model: str | None = None, output: str | Path = "runs", protocol: str = "base2new", shots: int = 16,
          seed: int = 1, subset: str = "base", sets: Sequence[str] = (), config: str | Path | None = None,
          tag: str | None = None, force: bool = False, resume: bool = True, progress: bool = True,
          device: str = "auto") -> Predictor:
    """Train ``method`` on ``dataset`` and evaluate it, as ``alignednorm train`` does; returns the trained predictor.

    The run goes to ``output/protocol/dataset/shots<K>/method/<variant>/seed<S>`` (``<variant>``:
    ``default``, ``tag``, or ``custom-<hash>`` of ``sets``/``config``); a finished run with the same
    settings is reused, an interrupted one resumes. The accuracies are in ``predictor.metrics``.

    Args:
        method: registered method name (``alignednorm.methods.list_methods()``).
        dataset: dataset name (built-in, or created with ``alignednorm datasets create``).
        data_root: the CoOp-layout data folder (default: ``$DATA_ROOT``).
        clip: CLIP checkpoint file, or ``"mini"``; ``clip_model`` its open_clip name when needed.
        protocol: whose presets to use: ``base2new``, ``fewshot``, ``crossdataset``, ``domaingen``.
        shots: K shots per class (0: every training image).
        subset: classes trained on: ``base`` (then evaluated on base and new) or ``all``.
        sets: config overrides ``key=value`` (``["train.epochs=5"]``); ``config`` a YAML file merged first.

    Example:
        >>> model = alignednorm.train("coop", "eurosat", data_root="data", clip="ViT-B-16.pt")  # doctest: +SKIP
        >>> model.metrics["eurosat"]["eval"]["new"]["accuracy"]  # doctest: +SKIP
    """
    from alignednorm.config import PROTOCOLS
    from alignednorm.errors import AlignedNormError
    from alignednorm.protocols.base_to_new import EVALUATIONS
    from alignednorm.protocols.runner import Evaluation

    if protocol not in PROTOCOLS:
        raise AlignedNormError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if subset not in ("base", "all"):
        raise AlignedNormError(f"subset {subset!r}: expected base or all")
    evaluations = EVALUATIONS if subset == "base" else (Evaluation("all", classes="all", rule="seen"),)
    run_dir, metrics = run_one(method, dataset, data_root, clip, clip_model, Path(output), protocol, shots, seed,
                               subset, evaluations, config, list(sets), tag, force, resume, progress=progress,
                               device=device)
    from alignednorm.engine.environment import resolve_device

    predictor = load(run_dir, device=resolve_device(device))
    predictor.metrics = {dataset: metrics}
    return predictor


def run_one(method: str, dataset: str, data_root, clip, clip_model: str | None, output: Path, protocol: str,
            shots: int, seed: int, train_subset: str, evaluations, config, sets: list[str], tag: str | None,
            force: bool, resume: bool = True, step_suffix: str = "", progress: bool = True, command: str | None = None,
            device: str = "auto") -> tuple[Path, dict]:
    """One job of the protocol runner (``train``, ``eval``): returns the run folder and the evaluation's metrics."""
    from alignednorm.data import get_dataset, resolve_data_root
    from alignednorm.protocols.runner import EvalStep, SweepRequest, canonical_datasets, is_finished, run_job

    try:
        import alignednorm.mini  # noqa: F401  (registers the mini benchmark's datasets)
    except ImportError:
        pass
    if clip is None:
        raise ConfigError("no backbone given: pass clip= (a CLIP checkpoint file, or 'mini')")
    if str(clip) == "mini":
        from alignednorm.mini import mini_clip_path

        clip = mini_clip_path()
    data_root = resolve_data_root(data_root)  # first: it registers the root's own datasets
    dataset = canonical_datasets([dataset])[0]
    suites = tuple(get_dataset(dataset).suites)
    request = SweepRequest(method=method, data_root=data_root, clip=str(clip), output=str(Path(output).resolve()),
                           suite=suites[0] if suites else "paper", datasets=(dataset,), seeds=(seed,), shots=(shots,),
                           clip_model=clip_model, config_file=str(Path(config).resolve()) if config else None,
                           sets=tuple(sets or ()), tag=tag, progress=progress, device=device)
    run_dir = request.run_dir(protocol, dataset, shots, seed)
    step = EvalStep(dataset, str(run_dir / "eval" / f"{dataset}{step_suffix}"), tuple(evaluations), protocol=protocol)
    job = request.job(protocol, dataset, shots, seed, train_subset, [step])
    job.resume = resume
    job.command = command or train_command(request, protocol, dataset, shots, seed, train_subset, step_suffix)
    reused = not force and is_finished(job)
    metrics = dict(run_job(job, force=force)[dataset])
    metrics["reused"] = reused
    return run_dir, metrics


def train_command(request, protocol: str, dataset: str, shots: int, seed: int, train_subset: str,
                  step_suffix: str = "") -> str:
    """The ``alignednorm train`` / ``eval`` command that reproduces a job (recorded in run.json and model cards)."""
    from alignednorm.engine.run import format_command

    words = (["eval", "--method", request.method, "--dataset", dataset, "--subset", step_suffix[1:]]
             if protocol == "eval"
             else ["train", "--method", request.method, "--dataset", dataset, "--protocol", protocol, "--shots", shots,
                   "--seed", seed, "--subset", train_subset])
    words += ["--data-root", request.data_root, "--clip", request.clip]
    words += ["--clip-model", request.clip_model] if request.clip_model else []
    words += ["--config", request.config_file] if request.config_file else []
    words += [w for item in request.sets for w in ("--set", item)]
    words += ["--tag", request.tag] if request.tag else []
    return format_command(["alignednorm", *words])
