"""Shareable prompts: ``alignednorm export RUN_DIR OUT_DIR`` and loading such a folder.

The folder is self-contained and ready to upload to a model hub as it is, in the layout PEFT and
open_clip users know: a config JSON (``alignednorm_config.json``: method, its config, the
backbone's file name, open_clip name and SHA-256, class names and templates, the run's metrics),
the learned tensors (``learnable.safetensors``) and a generated model card (``README.md``: metrics
table, the command that produced it, the citation). :func:`alignednorm.load` and ``alignednorm
predict`` accept it like a run folder; the backbone file is passed when it is not where the
exporting machine had it (its SHA-256 must match).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from alignednorm.engine.io import write_json, write_text
from alignednorm.engine.run import EXPORT_CONFIG, read_run_info
from alignednorm.errors import AlignedNormError
from alignednorm.methods import get_method_class

FORMAT = "alignednorm-prompt"


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


def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the shareable folder of the trained run ``run_dir`` to ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = read_run_info(run_dir)
    weights = run_dir / "learnable.safetensors"
    if get_method_class(info["method"]).traits.learns and not weights.is_file():
        raise AlignedNormError(f"{run_dir} has no learnable.safetensors: export a finished training run")
    if out_dir.exists() and not out_dir.is_dir():
        raise AlignedNormError(f"{out_dir} is a file; export writes a folder (config JSON, safetensors, model card)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AlignedNormError(f"{out_dir} exists and is not empty; choose another folder or pass --force")
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    metrics = run_metrics(run_dir)
    config = {
        "format": FORMAT, "format_version": 1, "method": info["method"], "config": cfg,
        "backbone": {"file": Path(info["clip"]).name, "path": info["clip"], "clip_model": info.get("clip_model"),
                     "sha256": info["clip_sha256"]},
        "classnames": info["classnames"], "templates": [info["template"]], "dataset": info["dataset"],
        "shots": info["shots"], "train_subset": info["train_subset"], "metrics": metrics,
        "command": info.get("command"), "environment": info.get("environment"),
        "learnable_parameters": info.get("learnable_parameters"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights.is_file():
        shutil.copyfile(weights, out_dir / "learnable.safetensors")
    write_json(out_dir / EXPORT_CONFIG, config)
    write_text(out_dir / "README.md", model_card(config))
    return out_dir


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
    if out_dir.exists() and not out_dir.is_dir():
        raise AlignedNormError(f"{out_dir} is a file; export writes a folder (config JSON, safetensors, model card)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AlignedNormError(f"{out_dir} exists and is not empty; choose another folder or pass --force")
    cfg = resolve_config(method, "base2new", dataset, None, list(sets or []))
    model = create_method(method, ClipBackbone.from_file(clip, clip_model), build(method, cfg)[0])
    import_official(model, checkpoint)
    config = {
        "format": FORMAT, "format_version": 1, "method": method, "config": OmegaConf.to_container(cfg, resolve=True),
        "backbone": {"file": Path(clip).name, "path": str(Path(clip).resolve()), "clip_model": clip_model,
                     "sha256": file_sha256(clip)},
        "classnames": list(classnames), "templates": [template], "dataset": dataset or "unknown", "shots": None,
        "train_subset": "unknown", "metrics": {}, "command": f"imported from the official checkpoint {checkpoint}",
        "learnable_parameters": sum(p.numel() for p in model.learnable_parameters()),
    }
    save_tensors(out_dir / "learnable.safetensors", model.learnable_state_dict(), metadata={"method": method})
    write_json(out_dir / EXPORT_CONFIG, config)
    write_text(out_dir / "README.md", model_card(config))
    return out_dir


def model_card(config: dict) -> str:
    """A model card (Hugging Face style front matter + Markdown) for an exported prompt."""
    method_cls = get_method_class(config["method"])
    rows = "\n".join(f"| {target} | " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in evals.items()) + " |"
                     for target, evals in config["metrics"].items()) or "| (not evaluated) | |"
    backbone = config["backbone"]
    note = f"\n> {method_cls.traits.note}\n" if method_cls.traits.note else ""
    return f"""---
library_name: alignednorm
tags: [prompt-learning, clip, {config["method"]}]
---

# {config["method"]} prompt for {config["dataset"]} ({config["shots"] or "?"}-shot, {config["train_subset"]} classes)
{note}
Learned with [alignednorm](https://pypi.org/project/alignednorm/) on the CLIP backbone
`{backbone["file"]}` (open_clip name: `{backbone["clip_model"] or "OpenAI format"}`,
SHA-256 `{backbone["sha256"]}`); {config["learnable_parameters"] or 0:,} learned parameters.

## Use

```python
import alignednorm
model = alignednorm.load("THIS_FOLDER", clip="path/to/{backbone["file"]}")
model.predict(["image.jpg"], classes=["cat", "dog"])
```

or `alignednorm predict THIS_FOLDER image.jpg --clip path/to/{backbone["file"]}`.

## Results (top-1 accuracy, %)

| test set | accuracy |
|---|---|
{rows}

## How it was made

```bash
{config.get("command") or "(command not recorded)"}
```

Method config:

```json
{json.dumps(config["config"]["method"], indent=2)}
```

## Citation

```bibtex
{method_cls.traits.citation.strip() or "(see the method's paper)"}
```
"""
