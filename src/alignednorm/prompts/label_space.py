"""What a classifier chooses among: class names, prompt templates, optional class descriptions.

Zero-shot ensembles and PromptSRC use several templates; HiCroPL uses CuPL-style per-class
descriptions. Every method receives one :class:`LabelSpace` and takes what it needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from alignednorm.errors import ConfigError

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one classification problem and how to phrase them.

    Attributes:
        classnames: class names in label order; ``_`` is read as a space in prompts (as CoOp does).
        templates: prompt templates, each with one ``{}`` for the class name; the first is the
            dataset's own, used by single-template methods.
        descriptions: optional ``{class name: [sentence, ...]}`` for every class (CuPL style).
        description_source: where the descriptions came from (a file path), for messages and records.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    descriptions: dict[str, tuple[str, ...]] | None = field(default=None, compare=False, hash=False)
    description_source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "classnames", tuple(self.classnames))
        templates = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        object.__setattr__(self, "templates", templates)
        if not self.classnames:
            raise ConfigError("a label space needs at least one class name; none were given")
        if any(not isinstance(c, str) or not c.strip() for c in self.classnames):
            raise ConfigError("class names must be non-empty strings; "
                              f"got {[c for c in self.classnames if not str(c).strip()]!r}")
        seen: dict[str, str] = {}
        for name in self.classnames:
            key = _normalise(name)
            if key in seen:
                raise ConfigError(f"class names {seen[key]!r} and {name!r} are the same class after normalisation "
                                  "(case, spaces, underscores); each class may appear once")
            seen[key] = name
        if not templates:
            raise ConfigError("a label space needs at least one prompt template")
        for template in templates:
            if template.count("{}") != 1:
                raise ConfigError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
        if self.descriptions is not None:
            self._check_descriptions()

    def _check_descriptions(self) -> None:
        source = self.description_source or "the class descriptions"
        missing = [c for c in self.classnames if c not in self.descriptions]
        if missing:
            raise ConfigError(f"{source}: no descriptions for class {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        empty = [c for c in self.classnames if not self.descriptions[c]]
        if empty:
            raise ConfigError(f"{source}: the description list of class {empty[0]!r} is empty")

    def __len__(self) -> int:
        return len(self.classnames)

    def prompts(self, template: int = 0) -> list[str]:
        """One prompt per class with template ``template``."""
        return [self.templates[template].format(c.replace("_", " ")) for c in self.classnames]

    def with_classnames(self, classnames) -> LabelSpace:
        """The same templates (and the descriptions of these classes) for other class names."""
        descriptions = None
        if self.descriptions is not None and all(c in self.descriptions for c in classnames):
            descriptions = {c: self.descriptions[c] for c in classnames}
        return LabelSpace(tuple(classnames), self.templates, descriptions, self.description_source)


def read_descriptions(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A CuPL-style JSON ``{"class name": ["sentence", ...]}``, checked (errors name the file and class)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"class descriptions file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file of class descriptions ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object {{\"class name\": [\"sentence\", ...]}}")
    out = {}
    for name, sentences in data.items():
        if isinstance(sentences, str) or not isinstance(sentences, list) or not all(
                isinstance(t, str) and t.strip() for t in sentences):
            raise ConfigError(f"{path}: the descriptions of class {name!r} must be a list of non-empty sentences")
        out[name] = tuple(sentences)
    return out


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@torch.no_grad()
def frozen_class_embeddings(backbone, space: LabelSpace, chunk: int = 256) -> Tensor:
    """L2-normalised frozen CLIP text features ``(C, E)`` of a label space.

    With several templates, each template's features are normalised, averaged over templates and
    normalised again (CLIP's prompt ensemble). Prompts are encoded ``chunk`` at a time, so 1,000
    classes × 80 templates fit in memory.
    """
    device = backbone.token_embedding.weight.device
    per_template = []
    for k in range(len(space.templates)):
        prompts = space.prompts(k)
        chunks = [backbone.encode_text(backbone.tokenize(prompts[i : i + chunk]).to(device)).features
                  for i in range(0, len(prompts), chunk)]
        per_template.append(F.normalize(torch.cat(chunks), dim=-1))  # (C, E)
    if len(per_template) == 1:
        return per_template[0]
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
