"""``alignednorm run <protocol>`` (one command per paper table) and ``alignednorm report``.

Registered in :mod:`alignednorm.cli.commands` with ``app.add_typer(run_app, name="run")`` and
``app.command("report")(report_cmd)``. The executor's options (``--partition``, ``--gpus``, ...) are
the fields of :class:`alignednorm.protocols.sweep.ExecutorOptions`, declared there once.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated

import typer

from alignednorm.cli.options import (
    Clip,
    ClipModel,
    ClipPretrained,
    Config,
    DataRoot,
    Datasets,
    Executor,
    GreedyListCommand,
    Method,
    Output,
    Seeds,
    Sets,
    Shots,
    SuiteName,
    Tag,
    interrupted_message,
    ints,
    setup_logging,
    split_values,
)

run_app = typer.Typer(help="Run a paper protocol as a sweep of runs: one command per table.", no_args_is_help=True)

DOCS = {
    "base2new": "Base-to-new (Table 1): train on base classes, evaluate base and new, per dataset and seed.",
    "crossdataset": "Cross-dataset (Table 2): train once per seed on the source, evaluate it and every target.",
    "domaingen": "Domain generalisation (Table 3): the cross-dataset model on the source's shifted test sets.",
    "fewshot": "Few-shot (Tables 4/11): train on K shots of all classes, evaluate on the full test set.",
}


def _executor_parameters() -> list[inspect.Parameter]:
    """``--partition``, ``--gpus``, ...: one option per field of ``ExecutorOptions`` that declares one."""
    import typing

    from alignednorm.protocols.executor import ExecutorOptions

    hints, params = typing.get_type_hints(ExecutorOptions), []
    for f in dataclasses.fields(ExecutorOptions):
        if "cli" not in f.metadata:
            continue
        repeated = typing.get_origin(hints[f.name]) is tuple
        kind = list[str] | None if repeated else hints[f.name]
        option = typer.Option(f.metadata["cli"], help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None if repeated else f.default,
                                        annotation=Annotated[kind, option]))
    return params


def _executor_options(values: dict):
    """The executor options the command line gave (repeated options as tuples)."""
    from alignednorm.protocols.executor import ExecutorOptions

    fields = {f.name: f for f in dataclasses.fields(ExecutorOptions) if "cli" in f.metadata}
    return ExecutorOptions(**{name: tuple(values[name] or ()) if isinstance(fields[name].default, tuple)
                              else values[name] for name in fields})


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
        verbose: bool = False,
        **executor_fields,
    ) -> None:
        from alignednorm.clip_names import backbone_source
        from alignednorm.data import resolve_data_root
        from alignednorm.engine.run import format_command
        from alignednorm.protocols import expand
        from alignednorm.protocols.runner import SweepRequest, is_finished
        from alignednorm.protocols.sweep import run_sweep

        setup_logging(verbose)
        clip_file, clip_model = backbone_source(clip, clip_model, clip_pretrained)
        request = SweepRequest(
            method=method, data_root=resolve_data_root(data_root), clip=str(clip_file),
            output=str(output.resolve()), suite=suite, datasets=tuple(split_values(datasets)) or None,
            seeds=ints(seeds, "--seeds") or (1, 2, 3), shots=ints(shots, "--shots"), clip_model=clip_model,
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
        options = _executor_options(executor_fields)
        reused = set() if force else {job.name for job in jobs if is_finished(job)}
        try:
            outcome = run_sweep(jobs, executor, force=force, options=options, output=request.output)
        except KeyboardInterrupt:
            typer.secho(interrupted_message(), err=True, fg="yellow")
            raise typer.Exit(130) from None
        _summarise(protocol, output, outcome, jobs, reused)

    command.__doc__ = DOCS[protocol]
    command.__name__ = f"run_{protocol}"
    # The declared options, then the executor's (from its dataclass) in place of **executor_fields.
    declared = inspect.signature(command, eval_str=True).parameters.values()
    command.__signature__ = inspect.Signature([p for p in declared if p.kind is not p.VAR_KEYWORD]
                                              + _executor_parameters())
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
    from alignednorm.protocols.tables import build_tables
    from alignednorm.results import collect, render_all

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
    from alignednorm.protocols.tables import build_tables, write_results_page
    from alignednorm.results import FORMATS, collect, render_all, write_report

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}; expected one of {', '.join(FORMATS)}", param_hint="--format")
    if compare not in (None, "paper"):
        raise typer.BadParameter(f"{compare!r}; the only published numbers shipped are 'paper'", param_hint="--compare")
    records = collect(output_dir)
    tables = build_tables(records, suite=suite, compare=compare)
    if cost:
        from alignednorm.protocols.cost import cost_table

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
