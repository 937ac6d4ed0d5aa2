"""Shareable prompts: ``alignednorm export RUN_DIR OUT_DIR`` and loading such a folder.

The folder is self-contained and ready to upload to a model hub as it is, in the layout PEFT and
open_clip users know: a config JSON (``alignednorm_config.json``: method, its config, the
backbone by name and SHA-256 with its open_clip name, class names and templates, the run's metrics),
the learned tensors (``learnable.safetensors``) and a generated model card (``README.md`` with the
Hugging Face hub's front matter: license, base model, pipeline tag, library, tags; metrics table, the
command that produced it, the citation).

Nothing in it is a path of the exporting machine: the backbone is named by its file name (``mini``
for the shipped tiny CLIP) and SHA-256, the data folder is ``DATA`` in the recorded command, and the
output folder, ``--config`` files and other paths keep their last component. So
:func:`alignednorm.load` and ``alignednorm predict`` take the backbone with ``clip=`` / ``--clip``,
or find the file of that name beside the folder or in the current folder (the SHA-256 must match).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from alignednorm.engine.io import write_json, write_text
from alignednorm.engine.run import EXPORT_CONFIG, read_run_info
from alignednorm.errors import AlignedNormError
from alignednorm.methods import get_method_class

FORMAT = "alignednorm-prompt"
FORMAT_VERSION = 2  # 2: backbone by name (no path), paths out of the command and config
DATA_PLACEHOLDER = "DATA"  # the data folder in a shared command: the reader's own CoOp-layout folder


def run_metrics(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """``{target: {evaluation: accuracy}}`` from the run's evaluation folders (``None``: not applicable)."""
    out = {}
    for path in sorted(run_dir.glob("eval/*/metrics.json")):
        try:
            data = json.loads(path.read_text())
            evals = {k: None if v["accuracy"] is None else round(v["accuracy"], 2) for k, v in data["eval"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AlignedNormError(f"{path}: not a finished evaluation's metrics ({type(exc).__name__}: {exc}); "
                                   "re-run the evaluation or delete its folder") from exc
        out[data.get("target", path.parent.name)] = evals
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False, license: str = "mit") -> Path:
    """Write the shareable folder of the trained run ``run_dir`` to ``out_dir``.

    Args:
        run_dir: a finished training run folder.
        out_dir: the folder to write (new or empty, unless ``force``).
        force: write into a non-empty folder.
        license: the model card's ``license`` (a Hugging Face hub license id).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = read_run_info(run_dir)
    weights = run_dir / "learnable.safetensors"
    if get_method_class(info["method"]).traits.learns and not weights.is_file():
        raise AlignedNormError(f"{run_dir} has no learnable.safetensors: export a finished training run")
    _check_destination(out_dir, force)
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    metrics = run_metrics(run_dir)
    backbone = backbone_record(Path(info["clip"]), info.get("clip_model"), info["clip_sha256"])
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": info["method"], "config": _without_paths(cfg),
        "backbone": backbone, "classnames": info["classnames"], "templates": [info["template"]],
        "dataset": info["dataset"], "shots": info["shots"], "train_subset": info["train_subset"], "metrics": metrics,
        "command": shareable_command(info.get("command"), info["dataset"], backbone["name"]),
        "environment": info.get("environment"), "learnable_parameters": info.get("learnable_parameters"),
        "license": license,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights.is_file():
        shutil.copyfile(weights, out_dir / "learnable.safetensors")
    write_json(out_dir / EXPORT_CONFIG, config)
    write_text(out_dir / "README.md", model_card(config))
    return out_dir


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise AlignedNormError(f"{out_dir} is a file; export writes a folder (config JSON, safetensors, model card)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AlignedNormError(f"{out_dir} exists and is not empty; choose another folder or pass --force")


def backbone_record(path: Path, clip_model: str | None, sha256: str) -> dict:
    """The backbone by name: ``name`` (``mini``, or the file name), ``file``, ``sha256``, the open_clip
    name and, when the SHA-256 is a known published checkpoint, its Hugging Face hub copy (``hub_id``).

    ``path`` repeats the name (no folder): readers of format 1 took the file from there.
    """
    name = "mini" if _is_mini_clip(path) else path.name
    return {"name": name, "file": path.name, "path": name, "clip_model": clip_model, "sha256": sha256,
            "hub_id": hub_base_model(sha256)}


def _is_mini_clip(path: Path) -> bool:
    try:
        from alignednorm.mini import mini_clip_path
    except ImportError:
        return False
    return path.resolve() == mini_clip_path().resolve()


def hub_base_model(sha256: str) -> str | None:
    """The Hugging Face hub id of an OpenAI CLIP checkpoint (open_clip's copy) whose SHA-256 is ``sha256``.

    OpenAI publishes each file under its SHA-256, so the match is exact; other checkpoints give None.
    """
    import open_clip

    for model, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
        if f"/{sha256}/" in (cfg.get("url") or "") and cfg.get("hf_hub"):
            return cfg["hf_hub"].rstrip("/")
    return None


def shareable_command(command: str | None, dataset: str, backbone: str) -> str | None:
    """The recorded command with this machine's paths out: ``--data-root DATA``, ``--clip <backbone name>``,
    the last component of ``--output`` and ``--config``; a ``--suite`` the dataset is not in is dropped
    (a run of an own dataset records the default ``--suite paper``)."""
    if not command:
        return command
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    out, k = [], 0
    while k < len(words):
        word, value = words[k], words[k + 1] if k + 1 < len(words) else None
        if value is not None and word in ("--data-root", "--clip", "--output", "--config", "--suite"):
            k += 2
            if word == "--suite" and value not in _suites(dataset):
                continue
            replaced = {"--data-root": DATA_PLACEHOLDER, "--clip": backbone}.get(word, Path(value).name)
            out += [word, value if word == "--suite" else replaced]
            continue
        out.append(word)
        k += 1
    return " ".join(shlex.quote(w) for w in out)


def _suites(dataset: str) -> tuple[str, ...]:
    from alignednorm.data import get_dataset

    try:
        return tuple(get_dataset(dataset).suites)
    except KeyError:  # a user's own dataset, registered by its data folder only
        return ()


def _without_paths(value):
    """The config with absolute paths (class descriptions, start values) reduced to their file names."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def import_official_checkpoint(method: str, checkpoint: str | Path, out_dir: str | Path, clip: Path,
                               clip_model: str | None, classnames: list[str], template: str, dataset: str | None,
                               sets: list[str] | None = None, force: bool = False) -> Path:
    """Turn a checkpoint of the method's official (Dassl) code into a shareable folder.

    The method's config is its preset (for ``dataset`` when given) with ``sets`` on top; the
    learned tensors are renamed by :mod:`alignednorm.compat.official` and loaded strictly, so a
    checkpoint that does not fit the config and backbone is refused with the keys that differ.
    """
    from alignednorm.backbone.clip import ClipBackbone
    from alignednorm.compat.official import import_official
    from alignednorm.config import build, resolve_config
    from alignednorm.engine.io import file_sha256, save_tensors
    from alignednorm.methods import create_method

    out_dir = Path(out_dir)
    _check_destination(out_dir, force)
    cfg = resolve_config(method, "base2new", dataset, None, list(sets or []))
    model = create_method(method, ClipBackbone.from_file(clip, clip_model), build(method, cfg)[0])
    import_official(model, checkpoint)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
        "config": _without_paths(OmegaConf.to_container(cfg, resolve=True)),
        "backbone": backbone_record(Path(clip), clip_model, file_sha256(clip)),
        "classnames": list(classnames), "templates": [template], "dataset": dataset or "unknown", "shots": None,
        "train_subset": "unknown", "metrics": {},
        "command": f"imported from the official checkpoint {Path(checkpoint).name}",
        "learnable_parameters": sum(p.numel() for p in model.learnable_parameters()), "license": "mit",
    }
    save_tensors(out_dir / "learnable.safetensors", model.learnable_state_dict(), metadata={"method": method})
    write_json(out_dir / EXPORT_CONFIG, config)
    write_text(out_dir / "README.md", model_card(config))
    return out_dir


def front_matter(config: dict) -> str:
    """The Hugging Face hub's model-card metadata (YAML; every value JSON-quoted, which YAML reads as is)."""
    backbone, q = config["backbone"], json.dumps
    tags = ["alignednorm", "prompt-learning", "clip", config["method"]]
    tags += [config["dataset"]] if config.get("dataset") and config["dataset"] != "unknown" else []
    lines = [f"license: {q(config.get('license') or 'mit')}"]
    lines += [f"base_model: {q(backbone['hub_id'])}"] if backbone.get("hub_id") else []
    lines += ["pipeline_tag: zero-shot-image-classification", "library_name: alignednorm", "tags:"]
    lines += [f"- {q(tag)}" for tag in dict.fromkeys(tags)]
    return "---\n" + "\n".join(lines) + "\n---\n"


def model_card(config: dict) -> str:
    """A model card (Hugging Face hub front matter + Markdown) for an exported prompt."""
    method_cls = get_method_class(config["method"])
    rows = "\n".join(f"| {target} | "
                     + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in evals.items()) + " |"
                     for target, evals in config["metrics"].items()) or "| (not evaluated) | |"
    backbone = config["backbone"]
    name = backbone.get("name") or backbone["file"]
    clip_arg = "mini" if name == "mini" else f"path/to/{backbone['file']}"
    hub = f" (on the hub: `{backbone['hub_id']}`)" if backbone.get("hub_id") else ""
    note = f"\n> {method_cls.traits.note}\n" if method_cls.traits.note else ""
    return f"""{front_matter(config)}
# {config["method"]} prompt for {config["dataset"]} ({config["shots"] or "?"}-shot, {config["train_subset"]} classes)
{note}
Learned with [alignednorm](https://pypi.org/project/alignednorm/) on the CLIP backbone
`{name}`{hub} (open_clip name: `{backbone["clip_model"] or "OpenAI format"}`,
SHA-256 `{backbone["sha256"]}`); {config["learnable_parameters"] or 0:,} learned parameters.

## Use

```python
import alignednorm
model = alignednorm.load("THIS_FOLDER", clip="{clip_arg}")
model.predict(["image.jpg"], classes=["cat", "dog"])
```

or `alignednorm predict THIS_FOLDER image.jpg --clip {clip_arg}`. Without `clip=` / `--clip` the backbone
file `{backbone["file"]}` is looked for in this folder, the folder above it and the current folder; its
SHA-256 must be the one above.

## Results (top-1 accuracy, %)

| test set | accuracy |
|---|---|
{rows}

## How it was made

```bash
{config.get("command") or "(command not recorded)"}
```

(`{DATA_PLACEHOLDER}`: the folder holding the datasets in the CoOp layout.)

Method config:

```json
{json.dumps(config["config"]["method"], indent=2)}
```

## Citation

```bibtex
{method_cls.traits.citation.strip() or "(see the method's paper)"}
```
"""
