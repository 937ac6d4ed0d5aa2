"""The ``alignednorm`` command: thin wrappers over library calls."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from alignednorm.errors import AlignedNormError
from alignednorm.protocols.cli import report_cmd, run_app

app = typer.Typer(help="Prompt learning for CLIP-like models: AlignedNorm, MMRL++, MMRL and baselines.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
list_app = typer.Typer(help="List what is available.", no_args_is_help=True)
datasets_app = typer.Typer(help="Inspect dataset folders.", no_args_is_help=True)
app.add_typer(list_app, name="list")
app.add_typer(datasets_app, name="datasets")
app.add_typer(run_app, name="run")
app.command("report")(report_cmd)

DataRoot = Annotated[Path | None, typer.Option("--data-root", help="CoOp-layout data folder (default: $DATA_ROOT).")]
Clip = Annotated[Path, typer.Option("--clip", help="CLIP checkpoint: OpenAI .pt, state dict, safetensors, open_clip.")]
ClipModel = Annotated[str | None, typer.Option("--clip-model", help="open_clip model name for open_clip checkpoints.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Config override key=value, e.g. train.epochs=5.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console entry point: user errors print one clear line and exit with status 2."""
    try:
        app()
    except AlignedNormError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(2)


@list_app.command("methods")
def list_methods_cmd() -> None:
    """Registered methods."""
    from alignednorm.methods import list_methods

    typer.echo("\n".join(list_methods()))


@list_app.command("datasets")
def list_datasets_cmd(suite: Annotated[str | None, typer.Option(help="only this suite (paper, mini, ...)")] = None):
    """Registered datasets with their folder and template."""
    from alignednorm.data import get_dataset, list_datasets

    _register_extras()
    for name in list_datasets(suite):
        spec = get_dataset(name)
        typer.echo(f"{name:20s} {spec.folder:28s} {spec.template}")


@datasets_app.command("check")
def datasets_check(data_root: Annotated[Path, typer.Argument(help="the CoOp-layout data folder")],
                   names: Annotated[list[str] | None, typer.Option("--dataset")] = None) -> None:
    """Report, per dataset, found / missing / broken and what the layout should be.

    Exits with status 1 when any checked dataset is missing or broken, 0 when all are ok.
    """
    from alignednorm.data import check_data_root, format_check

    _register_extras()
    results = check_data_root(str(data_root), names or None)
    typer.echo(format_check(results))
    if any(result.status != "ok" for result in results):
        raise typer.Exit(1)  # so the check can gate a script


def _register_extras() -> None:
    """Register the built-in mini benchmark's datasets when it is installed."""
    try:
        import alignednorm.mini  # noqa: F401
    except ImportError:
        pass


def _run(method: str, dataset: str, data_root: Path | None, clip: Path, clip_model: str | None, output: Path,
         protocol: str, shots: int, seed: int, train_subset: str, evals, config: Path | None, sets, force: bool,
         verbose: bool, resume: bool = False) -> dict:
    from alignednorm.config import resolve_config
    from alignednorm.data import resolve_data_root
    from alignednorm.engine.run import RunSpec, execute

    _setup_logging(verbose)
    _register_extras()
    cfg = resolve_config(method, protocol, dataset, config, [f"train.seed={seed}", *(sets or [])])
    spec = RunSpec(method=method, dataset=dataset, data_root=resolve_data_root(data_root), clip=str(clip),
                   clip_model=clip_model, output=str(output), config=cfg, shots=shots, train_subset=train_subset,
                   evals=evals)
    metrics = execute(spec, force=force, resume=resume)
    for name, result in metrics["eval"].items():
        typer.echo(f"{method} {result['dataset']}/{result['subset']} ({name}): {result['accuracy']:.2f}% "
                   f"on {result['num_samples']} images")
    typer.echo(f"run folder: {output}")
    return metrics


@app.command("eval")
def eval_cmd(
    method: Annotated[str, typer.Option(help="method name (see `alignednorm list methods`)")] = "zeroshot",
    dataset: Annotated[str, typer.Option(help="dataset name")] = ...,
    data_root: DataRoot = None, clip: Clip = ..., clip_model: ClipModel = None,
    subset: Annotated[str, typer.Option(help="all, base or new classes")] = "all",
    output: Annotated[Path, typer.Option(help="run folder")] = Path("runs/eval"),
    config: Annotated[Path | None, typer.Option(help="YAML config to merge")] = None,
    sets: Sets = None, force: bool = False, verbose: bool = False,
    skip_corrupt: Annotated[bool, typer.Option(help="skip unreadable images and count them")] = False,
) -> None:
    """Evaluate a method that learns nothing (zero-shot CLIP) on a dataset's test split."""
    sets = [*(sets or []), *(["data.skip_corrupt=true"] if skip_corrupt else [])]
    _run(method, dataset, data_root, clip, clip_model, output / dataset / method, "base2new", 0, 1, subset,
         [(subset, "", subset)], config, sets, force, verbose)


@app.command("train")
def train_cmd(
    method: Annotated[str, typer.Option(help="method name")] = ...,
    dataset: Annotated[str, typer.Option(help="dataset name")] = ...,
    data_root: DataRoot = None, clip: Clip = ..., clip_model: ClipModel = None,
    protocol: Annotated[str, typer.Option(help="whose presets to use: base2new, fewshot, crossdataset")] = "base2new",
    shots: int = 16, seed: int = 1,
    subset: Annotated[str, typer.Option(help="classes to train on: base or all")] = "base",
    output: Annotated[Path, typer.Option(help="runs folder")] = Path("runs"),
    config: Annotated[Path | None, typer.Option(help="YAML config to merge")] = None,
    sets: Sets = None, force: bool = False, verbose: bool = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its checkpoint")] = False,
    skip_corrupt: Annotated[bool, typer.Option(help="skip unreadable images and count them")] = False,
) -> None:
    """Train a method on one dataset, then evaluate it (base and new classes after base training)."""
    sets = [*(sets or []), *(["data.skip_corrupt=true"] if skip_corrupt else [])]
    evals = [("base", "", "base"), ("new", "", "new")] if subset == "base" else [("all", "", "all")]
    run_dir = output / protocol / dataset / method / f"seed{seed}"
    _run(method, dataset, data_root, clip, clip_model, run_dir, protocol, shots, seed, subset, evals, config, sets,
         force, verbose, resume)


@app.command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option(help="runs folder")] = Path("runs/demo"),
    data_root: Annotated[Path, typer.Option(help="where the mini world is generated")] = Path("data"),
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "zeroshot,mmrlpp,alignednorm",
    seed: int = 1,
    datasets: Annotated[str | None, typer.Option(help="comma-separated mini datasets (default: all)")] = None,
    sets: Sets = None,
    force: bool = False,
    verbose: bool = False,
) -> None:
    """Base-to-new on the built-in mini benchmark with the shipped tiny CLIP (CPU, minutes)."""
    from alignednorm.demo import run_demo

    _setup_logging(verbose)
    run_demo(output, data_root, tuple(m.strip() for m in methods.split(",") if m.strip()), seed,
             tuple(d.strip() for d in datasets.split(",")) if datasets else None, force, echo=typer.echo,
             sets=tuple(sets or ()))


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    classes: Annotated[str | None, typer.Option(help="comma-separated class names (default: the run's)")] = None,
    classes_file: Annotated[Path | None, typer.Option(help="a file with one class name per line")] = None,
    topk: int = 5,
    clip: Annotated[Path | None, typer.Option(help="backbone file, if it moved since training")] = None,
) -> None:
    """Top-k labels with probabilities for images, with the unified (fused) rule."""
    from alignednorm.predict import image_paths, load

    names = None
    if classes_file is not None:
        if not classes_file.is_file():
            raise AlignedNormError(f"class-name file {classes_file} does not exist")
        names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    elif classes:
        names = [c.strip() for c in classes.split(",") if c.strip()]
    predictor = load(run_dir, clip=clip)
    paths = image_paths(images)
    for path, top in zip(paths, predictor.predict(paths, names, topk)):
        typer.echo(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))


if __name__ == "__main__":
    main()
