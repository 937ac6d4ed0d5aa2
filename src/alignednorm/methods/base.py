"""What every prompt-learning method provides, and the registry that finds them by name.

A method is one module: a ``Method`` subclass with a nested ``Config`` dataclass, registered
with ``@register_method("name")``. The trainer, evaluator, protocols and CLI only use the
interface below, so adding a method never touches them.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.errors import CheckpointError, ConfigError, state_mismatch

SUBSETS = ("all", "base", "new")


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add fields with docstrings and checks."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field when a value is out of range."""

    def __post_init__(self):
        self.validate()


def check_range(config: MethodConfig, name: str, low: float | None = None, high: float | None = None) -> None:
    """Raise a ``ConfigError`` when ``config.name`` is outside ``[low, high]``."""
    value = getattr(config, name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{type(config).__qualname__}.{name} = {value!r} is out of range; expected a value in {bounds}")


@dataclass
class Outputs:
    """A method's forward result.

    Attributes:
        logits: ``(B, C)`` logits of the inference rule for the requested subset.
        features: ``(B, E)`` the L2-normalised image feature the inference rule uses.
        branches: named extra tensors (e.g. ``z_c``, ``z_p``, ``logits_rep``) for losses and analyses.
    """

    logits: Tensor
    features: Tensor | None = None
    branches: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class: a frozen :class:`ClipBackbone` plus the method's learnable modules.

    Subclasses implement ``set_classnames`` and ``forward``, and ``training_step`` when they
    learn anything. Parameters that require gradients are the learnable state; everything
    in ``backbone`` is frozen.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # True when learned tensors are tied to the class list (e.g. CoOp's class-specific contexts):
    # such a prompt only works for exactly the classes, in the order, it was trained on.
    class_specific: ClassVar[bool] = False

    def __init__(self, backbone: ClipBackbone, config: MethodConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.Config()
        self.classnames: list[str] = []
        self.template = "a photo of a {}."
        # The classes the learned prompt was trained on (set by the trainer or when loading a run).
        self.trained_classnames: list[str] | None = None
        self.trained_source = "the trained prompt"

    # ------------------------------------------------------------------ interface
    def set_classnames(self, classnames: list[str], template: str = "a photo of a {}.") -> None:
        """Set the label space; ``template`` has one ``{}`` for the class name."""
        if not classnames:
            raise ValueError("set_classnames needs at least one class name")
        self.classnames = list(classnames)
        self.template = template

    def prompts(self) -> list[str]:
        """The class prompts, with ``_`` in class names read as spaces (as CoOp does)."""
        return [self.template.format(c.replace("_", " ")) for c in self.classnames]

    def set_trained_classnames(self, classnames: list[str], run_dir) -> None:
        """Record the classes the learned prompt (saved in ``run_dir``) was trained on."""
        self.trained_classnames, self.trained_source = list(classnames), f"the prompt trained in {run_dir}"

    def check_classnames(self, classnames: list[str], rule: str) -> None:
        """Refuse class names the learned prompt cannot serve under inference ``rule``.

        The ``base`` rule (e.g. MMRL++'s representation branch) is only meaningful for the
        classes the prompt was trained on, and a class-specific prompt only for exactly those.
        """
        trained, source = self.trained_classnames, self.trained_source
        if trained is None or list(classnames) == list(trained):
            return
        if self.class_specific:
            raise CheckpointError(
                f"class names do not match {source}: method {self.name!r} learns one prompt per class and was "
                f"trained on {len(trained)} classes {_preview(trained)}, but {len(classnames)} classes were given "
                f"{_preview(classnames)}; pass the training classes in their order")
        if rule == "base" and set(classnames) != set(trained):
            unknown = [c for c in classnames if c not in set(trained)]
            absent = [c for c in trained if c not in set(classnames)]
            raise CheckpointError(
                f"class names do not match {source}: the 'base' rule is for the {len(trained)} classes the prompt "
                f"was trained on, but {len(unknown)} given classes are not among them {_preview(unknown)} and "
                f"{len(absent)} trained classes are absent {_preview(absent)}; evaluate other classes with the "
                f"'new' or 'all' rule")

    # forward(images, subset="all") -> Outputs is each subclass's own.

    def training_step(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Named loss terms for one batch; the key ``loss`` is what is back-propagated."""
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images).logits, labels)
        return {"loss": loss, "ce": loss.detach()}

    @torch.no_grad()
    def predict(self, images: Tensor, subset: str = "all") -> Tensor:
        """Logits ``(B, C)`` of the method's inference rule for ``subset`` (base / new / all)."""
        if subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
        return self(images, subset=subset).logits

    def on_epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Hook for methods that act between epochs (e.g. PromptSRC's prompt averaging)."""

    # ------------------------------------------------------------------ state
    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def learnable_state_dict(self) -> dict[str, Tensor]:
        """Only the learned tensors, by name; class-dependent buffers are not included."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_learnable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Load learned tensors, strictly: every key present, every shape right."""
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        mismatch = state_mismatch(own, state)
        if mismatch:
            raise CheckpointError(f"{source} does not fit method {self.name!r} on this backbone: {mismatch}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.dtype))


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a ``Method`` subclass available under ``name``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} (known: {', '.join(list_methods())})")
    return _METHODS[name]


def make_config(name: str, values: dict | None = None) -> MethodConfig:
    """Build method ``name``'s config from a dict, naming unknown keys with suggestions."""
    cls = get_method_class(name).Config
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} for method {name!r}{hint} (valid: {', '.join(sorted(fields))})")
    return cls(**values)


def create_method(name: str, backbone: ClipBackbone, config: MethodConfig | dict | None = None) -> Method:
    """Instantiate a registered method on ``backbone``."""
    cls = get_method_class(name)
    if not isinstance(config, MethodConfig):
        config = make_config(name, config)
    return cls(backbone, config)
