"""The ``alignednorm`` commands besides ``run`` and ``report`` (:mod:`.runs`): thin wrappers over library calls."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from alignednorm.cli.options import (
    Clip,
    ClipModel,
    ClipPretrained,
    Config,
    DataRoot,
    GreedyListCommand,
    Sets,
    Tag,
    interrupted_message,
    setup_logging,
    split_values,
)
from alignednorm.cli.runs import report_cmd, run_app
from alignednorm.errors import AlignedNormError

app = typer.Typer(help="Prompt learning for CLIP-like models: AlignedNorm, MMRL++, MMRL and baselines.\n\n"
                       "Start with `alignednorm demo` (the whole pipeline on the built-in mini benchmark, on CPU), "
                       "then your own data: `datasets create`, `run <protocol>`, `report`, `export`, `predict`.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
list_app = typer.Typer(help="List what is available.", no_args_is_help=True)
datasets_app = typer.Typer(help="Inspect dataset folders.", no_args_is_help=True)
app.add_typer(list_app, name="list")
app.add_typer(datasets_app, name="datasets")
app.add_typer(run_app, name="run")
mini_app = typer.Typer(help="The built-in mini benchmark.", no_args_is_help=True)
app.add_typer(mini_app, name="mini")
app.command("report")(report_cmd)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"alignednorm {version('alignednorm')}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Options of the command itself (the app's help is its Typer help text)."""


def main() -> None:
    """Console entry point: user errors print one clear line and exit with status 2."""
    try:
        app()
    except AlignedNormError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(2)


@list_app.command("methods")
def list_methods_cmd() -> None:
    """Registered methods (with their note, e.g. an unofficial reconstruction)."""
    from alignednorm.cli.method_names import method_notes  # no torch: read from the methods' source

    for name, note in method_notes().items():
        typer.echo(f"{name}  ({note})" if note else name)


@list_app.command("datasets")
def list_datasets_cmd(suite: Annotated[str | None, typer.Option(help="only this suite (paper, mini, ...)")] = None):
    """Registered datasets with their folder and template."""
    from alignednorm.data import get_dataset, list_datasets

    for name in list_datasets(suite):
        spec = get_dataset(name)
        typer.echo(f"{name:20s} {spec.folder:28s} {spec.template}")


@datasets_app.command("create")
def datasets_create(
    name: Annotated[str, typer.Argument(help="the new dataset's name (lower case, digits, _)")],
    source: Annotated[Path | None, typer.Option("--from", help="a folder with one sub-folder of images per class")
                      ] = None,
    csv_file: Annotated[Path | None, typer.Option("--from-csv", help="a CSV with columns path,label[,split]")] = None,
    data_root: DataRoot = None,
    template: Annotated[str, typer.Option(help="prompt template with {} for the class name")] = "a photo of a {}.",
    val_fraction: Annotated[float, typer.Option(help="share of each class for validation")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="share of each class for testing")] = 0.2,
    seed: Annotated[int, typer.Option(help="seeds the stratified split")] = 1,
    force: Annotated[bool, typer.Option(help="replace a dataset of this name created before")] = False,
) -> None:
    """Add your own dataset to a data root in the CoOp layout; every command then finds it by name.

    --from SRC reads SRC/<class name>/<image files>: one folder per class, at least 2 classes (a
    classifier, and base-to-new's base and new halves, need 2). Images in sub-folders of a class
    folder belong to that class, and the command says so (nested class folders look the same: pass
    the folder that holds the classes as --from). --from-csv reads a UTF-8 CSV with a header
    path,label[,split]; paths are relative to the CSV's folder, repeated rows count once.

    Files beside the class folders, non-image files and links that would loop are skipped and
    listed. Errors: empty classes, classes too small to split, class names that differ only by case,
    spaces or underscores, one image in two classes or splits, names of built-in datasets. The new
    dataset is swapped in only when complete, so --force may re-create it from its own images.
    """
    from alignednorm.data import resolve_data_root
    from alignednorm.data.custom import create_dataset

    root = resolve_data_root(data_root)
    report = create_dataset(name, root, source, csv_file, template, val_fraction, test_fraction, seed, force)
    for path, reason in report.skipped.items():
        typer.secho(f"skipped {path}: {reason}", err=True, fg="yellow")
    for note in report.notes:
        typer.secho(f"note: {note}", err=True, fg="yellow")
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    typer.echo(f"dataset {name!r}: {report.spec.num_classes} classes ({counts} images) in {Path(root) / name}; "
               f"use --dataset {name} --data-root {root}")


@datasets_app.command("check", cls=GreedyListCommand)
def datasets_check(
    data_root_arg: Annotated[Path | None, typer.Argument(
        metavar="[DATA_ROOT]", help="the CoOp-layout data folder (or --data-root; default: $DATA_ROOT)")] = None,
    data_root: DataRoot = None,
    names: Annotated[list[str] | None, typer.Option(
        "--datasets", "--dataset", help="datasets to check, e.g. --datasets dtd mypets (or comma-separated); "
                                        "default: every dataset present in DATA_ROOT")] = None,
) -> None:
    """Report, per dataset, found / missing / broken and what the layout should be.

    Without --datasets it judges the datasets present in the data folder (your own ones included) and
    lists the catalog's others as not present; with --datasets, exactly those. Exits with status 1
    when a judged dataset is missing or broken (or none is present), 0 when all are ok.
    """
    from alignednorm.data import check_data_root, format_check, list_datasets, resolve_data_root

    if data_root_arg is not None and data_root is not None and data_root_arg != data_root:
        raise AlignedNormError(f"two data folders given: {data_root_arg} and --data-root {data_root}; give one")
    root = resolve_data_root(data_root_arg or data_root)  # registers the root's own datasets too
    asked = split_values(names) or None
    if asked is None:
        from alignednorm.data import get_dataset

        present = [name for name in list_datasets() if (Path(root) / get_dataset(name).folder).exists()]
        absent = [name for name in list_datasets() if name not in present]
        asked = present or None  # nothing present: judge the whole catalog, with the layout each expects
    results = check_data_root(root, asked)
    typer.echo(format_check(results))
    if asked is not None and names is None and absent:
        typer.echo(f"not present, not checked ({len(absent)}): {', '.join(absent)}; check one with --datasets NAME")
    if any(result.status != "ok" for result in results):
        raise typer.Exit(1)  # so the check can gate a script


def _one_job(method: str, dataset: str, data_root: Path | None, clip: Path, clip_model: str | None, output: Path,
             protocol: str, shots: int, seed: int, train_subset: str, evaluations, config: Path | None, sets,
             tag: str | None, force: bool, verbose: bool, resume: bool = True, step_suffix: str = "") -> dict:
    """``train`` and ``eval`` are one-job cases of the protocol runner: same layout, files and reuse rule."""
    from alignednorm.predict import run_one

    setup_logging(verbose)
    try:
        run_dir, metrics = run_one(method, dataset, data_root, clip, clip_model, output, protocol, shots, seed,
                                   train_subset, evaluations, config, list(sets or ()), tag, force, resume, step_suffix)
    except KeyboardInterrupt:
        typer.secho(interrupted_message(), err=True, fg="yellow")
        raise typer.Exit(130) from None
    if metrics["reused"]:
        typer.echo("reused: this run and its evaluation finished before with the same settings (--force re-runs them)")
    for name, result in metrics["eval"].items():
        head = f"{method} {metrics['target']}/{result['classes']} ({name}, rule {result['rule']})"
        if result["accuracy"] is None:
            typer.echo(f"{head}: not applicable: {result.get('not_applicable', '')}")
            continue
        typer.echo(f"{head}: {result['accuracy']:.2f}% on {result['num_samples']} images")
    typer.echo(f"run folder: {run_dir}")
    return metrics


def _check_choice(value: str, choices, option: str) -> str:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(value, list(choices), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AlignedNormError(f"{option} {value!r} is not one of {', '.join(choices)}{hint}")
    return value




@app.command("eval")
def eval_cmd(
    method: Annotated[str, typer.Option(help="a method that learns nothing (zeroshot)")] = "zeroshot",
    dataset: Annotated[str, typer.Option(help="dataset name")] = ...,
    data_root: DataRoot = None, clip: Clip = None, clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    subset: Annotated[str, typer.Option(help="all, base or new classes")] = "all",
    output: Annotated[Path, typer.Option(help="runs folder")] = Path("runs"),
    config: Config = None,
    sets: Sets = None, tag: Tag = None, force: bool = False, verbose: bool = False,
    skip_corrupt: Annotated[bool, typer.Option(help="skip unreadable images and count them")] = False,
) -> None:
    """Evaluate a method that learns nothing (zero-shot CLIP) on a dataset's test split.

    Trained prompts are evaluated by `alignednorm train` and `alignednorm run <protocol>`.
    """
    from alignednorm.clip_names import backbone_source
    from alignednorm.methods import get_method_class
    from alignednorm.protocols.runner import Evaluation

    if get_method_class(method).traits.learns:
        raise AlignedNormError(f"--method {method!r} learns a prompt; `eval` only evaluates methods that learn "
                               "nothing (zeroshot). Train and evaluate it with `alignednorm train` or "
                               "`alignednorm run`")
    _check_choice(subset, ("all", "base", "new"), "--subset")
    sets = [*(sets or []), *(["data.skip_corrupt=true"] if skip_corrupt else [])]
    rule = {"all": "any", "base": "seen", "new": "unseen"}[subset]
    clip, clip_model = backbone_source(clip, clip_model, clip_pretrained)
    _one_job(method, dataset, data_root, clip, clip_model, output, "eval", 0, 1, "all",
             [Evaluation(subset, classes=subset, rule=rule)], config, sets, tag, force, verbose,
             step_suffix=f"-{subset}")


@app.command("train")
def train_cmd(
    method: Annotated[str, typer.Option(help="method name")] = ...,
    dataset: Annotated[str, typer.Option(help="dataset name")] = ...,
    data_root: DataRoot = None, clip: Clip = None, clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    protocol: Annotated[str, typer.Option(help="whose presets to use: base2new, fewshot, crossdataset, domaingen")
                        ] = "base2new",
    shots: int = 16, seed: int = 1,
    subset: Annotated[str, typer.Option(help="classes to train on: base or all")] = "base",
    output: Annotated[Path, typer.Option(help="runs folder")] = Path("runs"),
    config: Config = None,
    sets: Sets = None, tag: Tag = None, force: bool = False, verbose: bool = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its checkpoint")] = True,
    skip_corrupt: Annotated[bool, typer.Option(help="skip unreadable images and count them")] = False,
) -> None:
    """Train a method on one dataset, then evaluate it (base and new classes after base training).

    The run goes to OUTPUT/PROTOCOL/DATASET/shotsK/METHOD/VARIANT/seedS, as `alignednorm run` lays
    runs out; a finished run is reused only with exactly the same settings.
    """
    from alignednorm.clip_names import backbone_source
    from alignednorm.config import PROTOCOLS
    from alignednorm.protocols.base_to_new import EVALUATIONS
    from alignednorm.protocols.runner import Evaluation

    _check_choice(protocol, PROTOCOLS, "--protocol")
    _check_choice(subset, ("base", "all"), "--subset")
    if shots < 0:
        raise AlignedNormError(f"--shots {shots}: expected K >= 0 (0 = every training image)")
    sets = [*(sets or []), *(["data.skip_corrupt=true"] if skip_corrupt else [])]
    clip, clip_model = backbone_source(clip, clip_model, clip_pretrained)
    # Every test class was trained on after --subset all: the seen rule (MMRL++'s fused logits).
    evaluations = EVALUATIONS if subset == "base" else (Evaluation("all", classes="all", rule="seen"),)
    _one_job(method, dataset, data_root, clip, clip_model, output, protocol, shots, seed, subset, evaluations,
             config, sets, tag, force, verbose, resume)


class _DemoCommand(GreedyListCommand):
    greedy = ("--datasets", "--methods")


GeneratedRoot = Annotated[Path | None, typer.Option(
    "--data-root", help="where the mini world is generated, under DATA_ROOT/mini (default: $DATA_ROOT, else ./data)")]
MiniDatasets = Annotated[list[str] | None, typer.Option(
    "--datasets", help="mini datasets, e.g. --datasets mini_shapes mini_textures (or comma-separated; default: all)")]


def _generated_root(data_root: Path | None) -> Path:
    """``--data-root`` where the mini world is written: as everywhere, ``$DATA_ROOT`` when not given
    (here ``./data`` when that is unset too, since the folder is created)."""
    import os

    value = data_root if data_root is not None else Path(os.environ.get("DATA_ROOT") or "data")
    return Path(os.path.abspath(os.path.expanduser(value)))


@app.command("demo", cls=_DemoCommand)
def demo_cmd(
    output: Annotated[Path, typer.Option(help="runs folder")] = Path("runs/demo"),
    data_root: GeneratedRoot = None,
    methods: Annotated[list[str] | None, typer.Option(
        "--methods", help="methods, e.g. --methods zeroshot mmrlpp alignednorm (or comma-separated)")] = None,
    seed: int = 1,
    datasets: MiniDatasets = None,
    sets: Sets = None,
    force: bool = False,
    verbose: bool = False,
) -> None:
    """Base-to-new on the built-in mini benchmark with the shipped tiny CLIP (CPU, minutes)."""
    from alignednorm.demo import DEMO_METHODS, run_demo

    setup_logging(verbose)
    try:
        run_demo(output, _generated_root(data_root), tuple(split_values(methods)) or DEMO_METHODS, seed,
                 tuple(split_values(datasets)) or None, force, echo=typer.echo, sets=tuple(sets or ()))
    except KeyboardInterrupt:
        typer.secho(interrupted_message(), err=True, fg="yellow")
        raise typer.Exit(130) from None


@mini_app.command("generate", cls=GreedyListCommand)
def mini_generate_cmd(data_root: GeneratedRoot = None, datasets: MiniDatasets = None) -> None:
    """Generate the mini benchmark's images and split files in the CoOp layout (skipped when present).

    Then any command takes `--data-root DATA_ROOT --clip mini --dataset mini_shapes` (or `--suite mini`).
    """
    from alignednorm.engine.cpus import usable_cpus
    from alignednorm.mini import generate_world

    root = _generated_root(data_root)
    try:
        generate_world(root, names=split_values(datasets) or None, processes=usable_cpus())
    except KeyError as exc:
        raise AlignedNormError(str(exc.args[0])) from None
    typer.echo(f"mini world ready under {root / 'mini'}; use --data-root {root} --clip mini")


@app.command("analyze")
def analyze_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="trained run folders (any method), compared side by side")],
    output: Annotated[Path, typer.Option(help="folder for the PNGs, their numbers (JSON, CSV) and index.html")],
    data_root: DataRoot = None,
    clip: Annotated[Path | None, typer.Option(help="backbone file, if it moved since training")] = None,
    max_images: Annotated[int, typer.Option(help="test images per subset (base, new) and run")] = 500,
    zeroshot: Annotated[bool, typer.Option(help="add zero-shot CLIP as the reference")] = False,
    tsne: Annotated[bool, typer.Option(help="compute the t-SNE figure (the slowest step)")] = True,
    seed: Annotated[int, typer.Option(help="draws the image subsets, seeds t-SNE")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    verbose: bool = False,
) -> None:
    """Figures of the papers' analyses (norm ratio, per-layer norms, attention, uniformity/tolerance, t-SNE,
    prompt norms) for trained runs, with their numbers and one self-contained HTML page."""
    from alignednorm.analyze import AnalysisOptions, analyze_runs

    setup_logging(verbose)
    clip = clip or _exported_backbone(run_dirs)
    options = AnalysisOptions(data_root=str(data_root) if data_root else None, clip=str(clip) if clip else None,
                              max_images=max_images, zeroshot=zeroshot, tsne=tsne, seed=seed, device=device)
    page = analyze_runs(run_dirs, output, options)
    typer.echo(f"wrote {page}")


def _exported_backbone(run_dirs: list[Path]) -> Path | None:
    """The backbone of the exported folders among ``run_dirs``, found by name and SHA-256 (see alignednorm.load)."""
    from alignednorm.predict import exported_backbone

    found = [path for path in (exported_backbone(Path(d)) for d in run_dirs) if path is not None]
    return found[0] if found else None


@app.command("corrupt")
def corrupt_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="trained CoOp-style runs (coop, nemesis, cocoop)")],
    data_root: DataRoot = None,
    clip: Annotated[Path | None, typer.Option(help="backbone file, if it moved since training")] = None,
    max_images: Annotated[int, typer.Option(help="test images per run")] = 2000,
    seed: Annotated[int, typer.Option(help="draws the images and the REPLACE vectors")] = 0,
    output: Annotated[Path | None, typer.Option(help="also write the numbers as JSON")] = None,
) -> None:
    """Nemesis's corruption experiments: REPLACE / RESCALE each context position, accuracy change per
    position and the Low-Norm Effect frequency, in the paper's table shape (Tables A2/A3, Fig. 1b)."""
    from alignednorm.analyze import AnalysisOptions, corruption_runs

    clip = clip or _exported_backbone(run_dirs)
    options = AnalysisOptions(data_root=str(data_root) if data_root else None, clip=str(clip) if clip else None,
                              max_images=max_images, seed=seed)
    typer.echo(corruption_runs(run_dirs, options, output))


@app.command("bench")
def bench_cmd(
    method: Annotated[str, typer.Option(help="method name")] = "mmrlpp",
    classes: Annotated[str, typer.Option(help="comma-separated class counts")] = "50,500",
    geometry: Annotated[str, typer.Option(help="vit-b16, vit-b32, vit-l14 or tiny (random weights)")] = "vit-b16",
    clip: Annotated[Path | None, typer.Option(help="time this checkpoint instead of random weights")] = None,
    batch: int = 8,
    iters: Annotated[int, typer.Option(help="iterations per configuration (the median is shown)")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    clock: Annotated[str, typer.Option(help="wall, or cpu: process CPU seconds (for a busy machine)")] = "wall",
    settings: Annotated[str, typer.Option(help="each (off, then one more optimisation per row), off or on; "
                                              "peak memory is per process, so time off and on apart for it")] = "each",
    as_json: Annotated[bool, typer.Option("--json", help="print the numbers as JSON")] = False,
    data: Annotated[bool, typer.Option("--data", help="time the data path instead: loader images/s on generated "
                                       "500x375 JPEGs per worker count, beside the model's images/s")] = False,
    workers: Annotated[str, typer.Option(help="--data: comma-separated worker counts (default 0..CPUs)")] = "",
    images: Annotated[int, typer.Option(help="--data: JPEGs to generate and load")] = 256,
) -> None:
    """Seconds per training step and evaluation batch with each optimisation off and on, and the
    learnable-parameter count of every method (paper Table 5's columns); with --data, the data path."""
    import json

    from alignednorm.backbone.clip import ClipBackbone
    from alignednorm.bench import format_data_result, format_result, run_bench, run_data_bench
    from alignednorm.clip_names import resolve_clip_path

    if data:
        from alignednorm.cli.options import ints
        from alignednorm.engine.cpus import usable_cpus

        counts = ints([workers] if workers else None, "--workers") or tuple(range(usable_cpus() + 1))
        if min(counts) < 0 or images < 1:
            raise AlignedNormError("--workers needs counts >= 0 and --images a positive number")
        first = int(classes.split(",")[0]) if classes.split(",")[0].strip().isdigit() else 50
        result = run_data_bench(geometry, method, counts, images, batch, device, first)
        typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_data_result(result))
        return

    try:
        counts = tuple(int(c) for c in classes.split(",") if c.strip())
    except ValueError:
        raise AlignedNormError(f"--classes {classes!r}: expected comma-separated integers, e.g. 50,500") from None
    if not counts or min(counts) < 1 or iters < 1 or batch < 1:
        raise AlignedNormError("--classes, --iters and --batch need positive values")
    backbone = ClipBackbone.from_file(resolve_clip_path(clip)) if clip else None
    result = run_bench(method, geometry, counts, batch, iters, device, backbone, clock, settings)
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_result(result))


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished training run folder")],
    out_dir: Annotated[Path, typer.Argument(help="the folder to write (config JSON, safetensors, model card)")],
    force: Annotated[bool, typer.Option(help="write into a non-empty folder")] = False,
    license: Annotated[str, typer.Option(help="the model card's license (a Hugging Face hub license id)")] = "mit",
) -> None:
    """Write a self-contained, shareable folder of a trained prompt (loads with alignednorm.load / predict).

    It holds no path of this machine: the backbone is recorded by file name and SHA-256 (pass it to
    load / predict with clip= / --clip, or keep the file beside the folder), the data folder is DATA in
    the recorded command. The model card (README.md) carries the Hugging Face hub's metadata.
    """
    from alignednorm.export import export_run

    typer.echo(f"wrote {export_run(run_dir, out_dir, force=force, license=license)}")


@app.command("import-official")
def import_official_cmd(
    method: Annotated[str, typer.Argument(help="mmrl, mmrlpp, alignednorm, maple, promptsrc, ...")],
    checkpoint: Annotated[Path, typer.Argument(help="the official code's model.pth.tar-N")],
    out_dir: Annotated[Path, typer.Argument(help="the shareable folder to write")],
    clip: Clip = None, clip_model: ClipModel = None, clip_pretrained: ClipPretrained = None,
    dataset: Annotated[str | None, typer.Option(help="dataset it was trained on: presets, class names, template")
                       ] = None,
    data_root: DataRoot = None,
    classes: Annotated[str | None, typer.Option(help="comma-separated class names (else the dataset's base classes)")
                       ] = None,
    template: Annotated[str | None, typer.Option(help="prompt template (else the dataset's)")] = None,
    sets: Sets = None, force: bool = False,
) -> None:
    """Turn an official (Dassl) checkpoint into a folder that alignednorm.load and predict read."""
    from alignednorm.clip_names import backbone_source
    from alignednorm.data import get_dataset, load_splits, resolve_data_root, subsample_classes
    from alignednorm.export import import_official_checkpoint

    clip, clip_model = backbone_source(clip, clip_model, clip_pretrained)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if dataset is not None:
        root = resolve_data_root(data_root) if names is None else None
        spec = get_dataset(dataset)
        names = names or subsample_classes(load_splits(spec.name, root), "base").classnames
        template, dataset = template or spec.template, spec.name
    if not names:
        raise AlignedNormError("give --classes, or --dataset (with --data-root) to take its base classes")
    out = import_official_checkpoint(method, checkpoint, out_dir, clip, clip_model, names,
                                     template or "a photo of a {}.", dataset, sets, force)
    typer.echo(f"wrote {out}")


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder, or a folder written by export")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    classes: Annotated[str | None, typer.Option(help="comma-separated class names (default: the run's)")] = None,
    classes_file: Annotated[Path | None, typer.Option(help="a file with one class name per line")] = None,
    topk: Annotated[int | None, typer.Option(help="labels per image (default 5; more than the classes: all of them)"
                                             )] = None,
    clip: Annotated[Path | None, typer.Option(help="backbone file, if it moved since training (or an exported "
                                                   "folder's backbone)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per image (JSON Lines)")] = False,
    output: Annotated[Path | None, typer.Option(help="also write the predictions to this .csv (image, rank, "
                                                     "label, probability) or .json file")] = None,
) -> None:
    """Top-k labels with probabilities for images (rule: seen for training classes, else unseen).

    Files that are not readable images are reported on stderr and skipped; the others are still
    predicted, and the exit status is then 1.
    """
    from alignednorm.predict import image_paths, load, open_images

    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise AlignedNormError(f"--output {output}: expected a .csv or .json file name")
    if output is not None and output.is_dir():
        raise AlignedNormError(f"--output {output} is a folder; expected a .csv or .json file name")
    names = _class_names(classes, classes_file)
    predictor = load(run_dir, clip=clip)
    paths, opened, skipped = open_images(image_paths(images))
    if not opened:
        first = next(iter(skipped.values()))
        raise AlignedNormError(first if len(skipped) == 1 else f"none of the {len(skipped)} files is a readable image "
                                                               f"(first: {first})")
    for reason in skipped.values():
        typer.secho(f"skipped {reason}", err=True, fg="yellow")
    rows = [{"image": str(path), "labels": [{"label": name, "probability": round(prob, 6)} for name, prob in top]}
            for path, top in zip(paths, predictor.predict(opened, names, topk))]
    for row in rows:
        typer.echo(_json_line(row) if as_json else f"{row['image']}: " + ", ".join(
            f"{x['label']} {x['probability']:.3f}" for x in row["labels"]))
    if output is not None:
        _write_predictions(rows, output)
        typer.echo(f"wrote {output}", err=True)
    if skipped:
        raise typer.Exit(1)


def _class_names(classes: str | None, classes_file: Path | None) -> list[str] | None:
    if classes_file is not None:
        if not classes_file.is_file():
            raise AlignedNormError(f"class-name file {classes_file} does not exist")
        return [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    if classes is not None:
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if not names:
            raise AlignedNormError(f"--classes {classes!r}: no class names; give comma-separated names or omit it")
        return names
    return None


def _json_line(row: dict) -> str:
    import json

    return json.dumps(row, ensure_ascii=False)


def _write_predictions(rows: list[dict], path: Path) -> None:
    """``.csv``: one row per image and rank; ``.json``: the list of per-image objects (written atomically)."""
    import csv
    import io
    import json

    from alignednorm.engine.io import write_text

    if path.suffix.lower() == ".json":
        write_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "rank", "label", "probability"])
    for row in rows:
        for rank, label in enumerate(row["labels"], 1):
            writer.writerow([row["image"], rank, label["label"], f"{label['probability']:.6f}"])
    write_text(path, buffer.getvalue())


if __name__ == "__main__":
    main()
