"""``alignednorm run <protocol>`` (one command per paper table) and ``alignednorm report``.

Registered in :mod:`alignednorm.cli` with ``app.add_typer(run_app, name="run")`` and
``app.command("report")(report_cmd)``. The list options ``--seeds``, ``--shots`` and ``--datasets``
take several values in any of the forms ``--seeds 1 2 3``, ``--seeds 1,2,3`` or ``--seeds 1 --seeds 2``.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from alignednorm.errors import ConfigError

run_app = typer.Typer(help="Run a paper protocol as a sweep of runs: one command per table.", no_args_is_help=True)

DOCS = {
    "base2new": "Base-to-new (Table 1): train on base classes, evaluate base and new, per dataset and seed.",
    "crossdataset": "Cross-dataset (Table 2): train once per seed on the source, evaluate it and every target.",
    "domaingen": "Domain generalisation (Table 3): the cross-dataset model on the source's shifted test sets.",
    "fewshot": "Few-shot (Tables 4/11): train on K shots of all classes, evaluate on the full test set.",
}

Method = Annotated[str, typer.Option(help="method name (see `alignednorm list methods`)")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--datasets", help="datasets trained on (base2new, fewshot) or targets (crossdataset, domaingen); "
                       "default: the suite's")]
SuiteName = Annotated[str, typer.Option(help="benchmark suite naming the datasets: paper or mini")]
Seeds = Annotated[list[str] | None, typer.Option(help="training seeds, e.g. --seeds 1 2 3 (the default)")]
Shots = Annotated[list[str] | None, typer.Option(help="K shots per class (default 16; fewshot: 1,2,4,8,16)")]
DataRoot = Annotated[Path | None, typer.Option("--data-root", help="CoOp-layout data folder (default: $DATA_ROOT).")]
Clip = Annotated[Path | None, typer.Option("--clip", help="CLIP checkpoint file, or 'mini' for the mini benchmark's.")]
ClipPretrained = Annotated[str | None, typer.Option(
    "--clip-pretrained", help="open_clip pretrained tag or local-dir:FOLDER (local cache only), with --clip-model")]
ClipModel = Annotated[str | None, typer.Option("--clip-model", help="open_clip model name for open_clip checkpoints.")]
Output = Annotated[Path, typer.Option(help="runs folder")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="config override key=value, e.g. train.epochs=5")]
Config = Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="YAML config merged over the presets")]
Tag = Annotated[str | None, typer.Option(
    help="name of this config variant (run folder level; default: 'default', or a hash of --set/--config)")]
Executor = Annotated[str, typer.Option(help="inline (this process), local (a process per job, one per GPU) or slurm")]


class GreedyListCommand(TyperCommand):
    """Reads ``--seeds 1 2 3`` as ``--seeds 1 --seeds 2 --seeds 3`` (click options take one value each)."""

    greedy = ("--seeds", "--shots", "--datasets")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        out, current = [], None
        for arg in args:
            if arg.startswith("-"):
                current = arg if arg in self.greedy else None
            elif current is not None and out[-1] != current:
                out.append(current)  # a further value of the last list option
            out.append(arg)
        return super().parse_args(ctx, out)


def split_values(values: list[str] | None) -> list[str]:
    """Repeated and comma- or space-separated values, in order, without duplicates."""
    return list(dict.fromkeys(v for item in values or [] for v in re.split(r"[,\s]+", item.strip()) if v))


def _ints(values: list[str] | None, option: str) -> tuple[int, ...] | None:
    try:
        parsed = tuple(dict.fromkeys(int(v) for v in split_values(values)))
    except ValueError:
        raise ConfigError(f"{option} {' '.join(values or [])!r}: expected integers, e.g. {option} 1,2,3") from None
    return parsed or None


class _ProgressHandler(logging.StreamHandler):
    """Plain lines on the current ``sys.stderr`` (a test runner may replace it between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current stderr is always used
        pass


def setup_logging(verbose: bool) -> None:
    """Warnings (everything with ``--verbose``), and the progress lines where no progress bar shows.

    Progress bars need a terminal: when stderr is a log file, a pipe or CI, the ``alignednorm.progress``
    lines (each job's start and end with its accuracies, each epoch's loss and validation accuracy)
    are printed instead, on stderr, so stdout keeps only the results.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    progress = logging.getLogger("alignednorm.progress")
    for handler in [h for h in progress.handlers if isinstance(h, _ProgressHandler)]:
        progress.removeHandler(handler)
    lines = not verbose and not sys.stderr.isatty()  # --verbose logs them with everything else
    if lines:
        handler = _ProgressHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
    progress.setLevel(logging.INFO if lines else logging.NOTSET)
    progress.propagate = not lines  # never twice


def interrupted_message() -> str:
    """What Ctrl-C prints: the same command resumes (finished runs are reused, an interrupted one continues)."""
    from alignednorm.engine.run import format_command

    return ("interrupted; run the same command again to resume (finished runs are reused, the interrupted run "
            f"continues from its last finished epoch): {format_command(['alignednorm', *sys.argv[1:]])}")


def _register_extras() -> None:
    try:
        import alignednorm.mini  # noqa: F401  (registers the mini benchmark's datasets and suite)
    except ImportError:
        pass


def _make_run_command(protocol: str):
    def command(
        method: Method = ..., datasets: Datasets = None, suite: SuiteName = "paper", seeds: Seeds = None,
        shots: Shots = None, data_root: DataRoot = None, clip: Clip = None, clip_model: ClipModel = None,
        clip_pretrained: ClipPretrained = None,
        output: Output = Path("runs"), sets: Sets = None, config: Config = None, tag: Tag = None,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
        force: Annotated[bool, typer.Option(help="re-run finished runs")] = False,
        resume: Annotated[bool, typer.Option(help="continue interrupted runs from their checkpoints")] = True,
        executor: Executor = "inline",
        dry_run: Annotated[bool, typer.Option(help="list the jobs and exit")] = False,
        partition: Annotated[str | None, typer.Option(help="SLURM partition")] = None,
        gpus: Annotated[int, typer.Option(help="GPUs per SLURM job")] = 1,
        cpus: Annotated[int, typer.Option(help="CPU cores per SLURM job")] = 8,
        time: Annotated[int, typer.Option(help="time limit per job, minutes (slurm, local)")] = 24 * 60,
        mem: Annotated[str | None, typer.Option(help="memory per SLURM job, e.g. 64G")] = None,
        array_parallelism: Annotated[int, typer.Option(help="SLURM array tasks running at once")] = 64,
        account: Annotated[str | None, typer.Option(help="SLURM account")] = None,
        qos: Annotated[str | None, typer.Option(help="SLURM quality of service")] = None,
        slurm_arg: Annotated[list[str] | None, typer.Option(help="extra sbatch option key=value")] = None,
        verbose: bool = False,
    ) -> None:
        from alignednorm.clip_names import backbone_source
        from alignednorm.data import resolve_data_root
        from alignednorm.engine.run import format_command

        from . import expand
        from .runner import SweepRequest, is_finished
        from .sweep import ExecutorOptions, run_sweep

        setup_logging(verbose)
        _register_extras()
        clip_file, clip_model = backbone_source(clip, clip_model, clip_pretrained)
        request = SweepRequest(
            method=method, data_root=resolve_data_root(data_root), clip=str(clip_file),
            output=str(output.resolve()), suite=suite, datasets=tuple(split_values(datasets)) or None,
            seeds=_ints(seeds, "--seeds") or (1, 2, 3), shots=_ints(shots, "--shots"), clip_model=clip_model,
            config_file=str(config.resolve()) if config else None, sets=tuple(sets or ()), tag=tag, device=device,
            progress=executor == "inline")
        jobs = expand(protocol, request)
        for job in jobs:
            job.resume = resume
            job.command = format_command(["alignednorm", "run", protocol, *_request_words(request)])
        if dry_run:
            for job in jobs:
                typer.echo(f"{job.name}: evaluates {', '.join(step.target for step in job.evals)}")
            return
        options = ExecutorOptions(partition=partition, gpus=gpus, cpus=cpus, timeout_min=time, mem=mem,
                                  array_parallelism=array_parallelism, account=account, qos=qos,
                                  slurm_args=tuple(slurm_arg or ()))
        reused = set() if force else {job.name for job in jobs if is_finished(job)}
        try:
            outcome = run_sweep(jobs, executor, force=force, options=options, output=request.output)
        except KeyboardInterrupt:
            typer.secho(interrupted_message(), err=True, fg="yellow")
            raise typer.Exit(130) from None
        _summarise(protocol, output, outcome, jobs, reused)

    command.__doc__ = DOCS[protocol]
    command.__name__ = f"run_{protocol}"
    return command


def _request_words(request) -> list:
    """Options of ``run`` that reproduce ``request`` (for the records of its runs)."""
    words = ["--method", request.method, "--suite", request.suite, "--data-root", request.data_root,
             "--clip", request.clip, "--seeds", ",".join(map(str, request.seeds)), "--output", request.output]
    words += ["--datasets", ",".join(request.datasets)] if request.datasets else []
    words += ["--shots", ",".join(map(str, request.shots))] if request.shots else []
    words += ["--clip-model", request.clip_model] if request.clip_model else []
    words += ["--config", request.config_file] if request.config_file else []
    words += [w for item in request.sets for w in ("--set", item)]
    return words + (["--tag", request.tag] if request.tag else [])


def _summarise(protocol: str, output: Path, outcome, jobs: list, reused: set[str]) -> None:
    """The tables of the jobs this command ran or reused (not of everything else in ``output``), then counts."""
    if outcome.submitted:
        ids = sorted(set(outcome.submitted.values()))
        typer.echo(f"submitted {len(outcome.submitted)} jobs to SLURM ({ids[0]} … {ids[-1]}); "
                   f"when they finish: alignednorm report {output}")
        return
    from alignednorm.results import collect, render_all

    from .tables import build_tables

    prefix = {"base2new": "table1", "crossdataset": "table2", "domaingen": "table3", "fewshot": "table4"}[protocol]
    ours = {Path(step.run_dir).resolve() for job in jobs for step in job.evals}
    records = [r for r in collect(output) if Path(r.path).parent.resolve() in ours]
    tables = [t for t in build_tables(records) if t.key.startswith(prefix)]
    if tables:
        typer.echo(render_all(tables, "md"))
    note = (f" ({len(reused)} reused: finished before with the same settings; --force re-runs them)" if reused
            else "")
    typer.echo(f"{len(outcome.finished)} of {len(jobs)} jobs finished{note}; runs in {output}; "
               f"all runs there: alignednorm report {output}")
    if outcome.failed:
        for name, error in outcome.failed.items():
            typer.secho(f"failed: {name}: {error}", err=True, fg="red")
        raise typer.Exit(1)


for _protocol in DOCS:
    run_app.command(_protocol, cls=GreedyListCommand)(_make_run_command(_protocol))


def report_cmd(
    output_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="the runs folder")],
    compare: Annotated[str | None, typer.Option(help="put published numbers beside ours: paper")] = None,
    fmt: Annotated[str, typer.Option("--format", help="printed format: md, csv or latex")] = "md",
    suite: Annotated[str | None, typer.Option(help="suite whose datasets are the rows (default: the runs')")] = None,
    write: Annotated[bool, typer.Option("--write/--no-write", help="also write .md/.csv/.tex files and report.html")
                     ] = True,
    report_dir: Annotated[Path | None, typer.Option(help="where files go (default OUTPUT_DIR/report)")] = None,
    cost: Annotated[bool, typer.Option(help="also the cost table (train/test seconds, parameters, memory; Table 5)")
                    ] = False,
    analysis: Annotated[list[Path] | None, typer.Option(
        help="folders holding `alignednorm analyze` pages to link (OUTPUT_DIR and the report folder are searched)")
                        ] = None,
) -> None:
    """Build the paper's tables from the runs' metrics.json files (mean ± std over seeds), and report.html."""
    from alignednorm.results import FORMATS, collect, render_all, write_report

    from .tables import build_tables, write_results_page

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}; expected one of {', '.join(FORMATS)}", param_hint="--format")
    if compare not in (None, "paper"):
        raise typer.BadParameter(f"{compare!r}; the only published numbers shipped are 'paper'", param_hint="--compare")
    _register_extras()
    records = collect(output_dir)
    tables = build_tables(records, suite=suite, compare=compare)
    if cost:
        from .cost import cost_table

        table = cost_table(output_dir)
        tables += [table] if table is not None else []
    if not tables:
        typer.echo(f"no evaluated runs (metrics.json with accuracies) under {output_dir}")
        return
    typer.echo(render_all(tables, fmt))
    if write:
        folder = report_dir or output_dir / "report"
        write_report(tables, folder)
        page = write_results_page(output_dir, records, tables, folder, tuple(analysis or ()))
        typer.echo(f"wrote {len(tables)} tables (md, csv, tex) to {folder} and the page {page}", err=True)
