"""How a method's official code names its learned tensors: declared by the method, read by the importer.

As timm keeps each model's ``checkpoint_filter_fn`` beside the model, each method declares its own
:class:`OfficialNames` in ``MethodTraits(official_names=...)``; ``compat/official.py`` only reads
Dassl's files and applies it. Adding a method that imports official checkpoints touches its own
module alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# (official name pattern, our name): a ``re`` template (``r"text_aligner.\2.\1"``) or a function of the match.
Rule = tuple[str, "str | Callable[[re.Match], str]"]


def _apply(rules: tuple[Rule, ...], name: str) -> str | None:
    for pattern, target in rules:
        match = re.match(pattern, name)
        if match:
            return target(match) if callable(target) else match.expand(target)
    return None


@dataclass(frozen=True)
class OfficialNames:
    """Official learned-tensor names ↔ ours.

    Attributes:
        rules: ``(pattern, target)`` from official names to ours, first match wins; names matching
            none (frozen CLIP, class-specific buffers) are dropped, as the official loader does.
        example: an official name, quoted when a file holds none of them.
        reverse: ``(pattern, target)`` from our names to official ones (for writing official files).
        finish: applied to the converted state (e.g. numbering that needs every name first).
    """

    rules: tuple[Rule, ...]
    example: str
    reverse: tuple[Rule, ...] = ()
    finish: Callable[[dict], dict] | None = None

    def to_ours(self, name: str) -> str | None:
        """Our name for one official tensor (before ``finish``), ``None`` for tensors we do not learn."""
        return _apply(self.rules, name.removeprefix("module."))

    def to_official(self, name: str, official_names=None) -> str | None:
        """The official name of one of our tensors (``None`` if it has none, or not among ``official_names``)."""
        official = _apply(self.reverse, name)
        return official if official is None or official_names is None or official in official_names else None

    def convert(self, state: dict) -> dict:
        """The learned tensors of an official state dict, under our names."""
        out = {ours: tensor for name, tensor in state.items() if (ours := self.to_ours(name)) is not None}
        return self.finish(out) if self.finish is not None else out
