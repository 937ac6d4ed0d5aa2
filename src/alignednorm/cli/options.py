"""Options and helpers every ``alignednorm`` command shares, declared once.

The list options (``--seeds``, ``--shots``, ``--datasets``, ``--methods``) take several values in
any of the forms ``--seeds 1 2 3``, ``--seeds 1,2,3`` or ``--seeds 1 --seeds 2``.
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

DataRoot = Annotated[Path | None, typer.Option("--data-root", help="CoOp-layout data folder (default: $DATA_ROOT).")]
Clip = Annotated[Path | None, typer.Option(
    "--clip", help="CLIP checkpoint: OpenAI .pt, state dict, safetensors, open_clip; 'mini' for the mini benchmark's "
                   "tiny CLIP.")]
ClipModel = Annotated[str | None, typer.Option("--clip-model", help="open_clip model name for open_clip checkpoints.")]
ClipPretrained = Annotated[str | None, typer.Option(
    "--clip-pretrained", help="open_clip pretrained tag (e.g. laion2b_s34b_b88k) or local-dir:FOLDER, read from the "
                              "local cache (never downloaded); with --clip-model instead of --clip")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Config override key=value, e.g. train.epochs=5.")]
Method = Annotated[str, typer.Option(help="method name (see `alignednorm list methods`)")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--datasets", help="datasets trained on (base2new, fewshot) or targets (crossdataset, domaingen); "
                       "default: the suite's")]
SuiteName = Annotated[str, typer.Option(help="benchmark suite naming the datasets: paper or mini")]
Seeds = Annotated[list[str] | None, typer.Option(help="training seeds, e.g. --seeds 1 2 3 (the default)")]
Shots = Annotated[list[str] | None, typer.Option(help="K shots per class (default 16; fewshot: 1,2,4,8,16)")]
Output = Annotated[Path, typer.Option(help="runs folder")]
Config = Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="YAML config merged over the presets")]
Tag = Annotated[str | None, typer.Option(
    help="name of this config variant (run folder level; default: 'default', or a hash of --set/--config)")]
Executor = Annotated[str, typer.Option(help="inline (this process), processes (parallel CPU processes, "
                                              "--processes N), local (a process per job, one per GPU) or slurm")]


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


def ints(values: list[str] | None, option: str) -> tuple[int, ...] | None:
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


