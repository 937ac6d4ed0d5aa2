"""What every prompt-learning method provides, and the registry that finds them by name.

A method is one module: a ``Method`` subclass with a nested ``Config`` dataclass, registered
with ``@register_method("name")``. The trainer, evaluator, protocols and CLI only use the
interface below, so adding a method never touches them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.errors import CheckpointError, ConfigError, state_mismatch
from alignednorm.methods.official_names import OfficialNames
from alignednorm.prompts.label_space import DEFAULT_TEMPLATE, LabelSpace, frozen_class_embeddings

# Inference rules: the classes asked about are the ones the prompt was trained on (``seen``),
# others (``unseen``), or a mix / not known (``any``). Decoupled methods (MMRL++) read it.
RULES = ("seen", "unseen", "any")


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add fields with docstrings and checks."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field when a value is out of range."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{type(self).__qualname__}.{f.name} = {value!r}; expected a finite number")
        self.validate()


def check_range(config: MethodConfig, name: str, low: float | None = None, high: float | None = None) -> None:
    """Raise a ``ConfigError`` when ``config.name`` is outside ``[low, high]``."""
    value = getattr(config, name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{type(config).__qualname__}.{name} = {value!r} is out of range; "
                          f"expected a value in {bounds}")


@dataclass(frozen=True)
class MethodTraits:
    """Framework traits of a method, declared as ``traits = MethodTraits(...)`` on its class.

    Attributes:
        learns: False for methods that learn nothing (zero-shot CLIP): a run only evaluates them.
        class_specific: learned tensors are tied to the class list (CoOp's class-specific contexts,
            the linear probe): such a prompt only serves exactly the classes, in order, it was trained on.
        frozen_image_features: logits depend on images only through the frozen CLIP's image features
            (zero-shot, linear probe): evaluations may reuse cached features (``engine.feature_cache``)
            and call :meth:`Method.logits_from_image_features` instead of :meth:`Method.predict`.
        uses_descriptions: reads the label space's class descriptions (HiCroPL): a run without
            descriptions records that it fell back to the templates.
        note: shown in ``list methods`` and report rows (e.g. "unofficial reconstruction").
        citation: BibTeX of the method's paper, for the model card of exported prompts.
        official_names: how the official code names the learned tensors (``import-official``,
            parity); ``None`` for methods without official checkpoints to import.
    """

    learns: bool = True
    class_specific: bool = False
    frozen_image_features: bool = False
    uses_descriptions: bool = False
    note: str = ""
    citation: str = ""
    official_names: OfficialNames | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = OfficialNames if f.name == "official_names" else type(f.default)
            if not (isinstance(value, expected) or (value is None and f.default is None)) or (
                    expected is not bool and isinstance(value, bool)):
                raise TypeError(f"MethodTraits.{f.name} = {value!r}; expected a {expected.__name__}")


@dataclass
class Outputs:
    """A method's forward result.

    Attributes:
        logits: ``(B, C)`` logits of the inference rule asked for.
        features: ``(B, E)`` the L2-normalised image feature the inference rule uses.
        branches: named extra tensors (e.g. ``z_c``, ``z_p``, ``logits_rep``) for losses and analyses.
    """

    logits: Tensor
    features: Tensor | None = None
    branches: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StepState:
    """Where training is when the trainer calls a method (0-based counters)."""

    epoch: int = 0
    max_epochs: int = 1
    step: int = 0
    global_step: int = 0


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ConfigError(f"inference rule {rule!r} is not one of {RULES} (seen: the classes the prompt was trained "
                          "on; unseen: other classes; any: a mix or unknown)")
    return rule


class Method(nn.Module, abc.ABC):
    """Base class: a frozen :class:`ClipBackbone` plus the method's learnable modules.

    Subclasses implement ``forward(images, rule, trace)`` and, when their class embeddings are not
    the frozen CLIP ones, ``compute_text_features``; ``training_step`` when they learn anything.
    Parameters that require gradients are the learnable state; everything in ``backbone`` is frozen.

    Text features are cached by the base class and recomputed after any of: a new label space,
    a switch of train/eval mode, a load of learned tensors, a config override.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # What the framework needs to know about the method, in one attribute a method's own names
    # cannot shadow. An instance may refine it from its config (CoOp's class-specific context).
    traits: MethodTraits = MethodTraits()

    def __init__(self, backbone: ClipBackbone, config: MethodConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config if config is not None else self.Config()
        self.label_space: LabelSpace | None = None
        # The classes the learned prompt was trained on (set by the trainer or when loading a run).
        self.trained_classnames: list[str] | None = None
        self.trained_source = "the trained prompt"
        self._text_cache: Tensor | None = None
        self._frozen_text: tuple[LabelSpace, Tensor] | None = None

    # ------------------------------------------------------------------ label space
    def set_label_space(self, space: LabelSpace) -> None:
        """Set what the method classifies among; subclasses react in :meth:`on_label_space`."""
        self.label_space = space
        self.invalidate_text_cache()
        self.on_label_space(space)

    def set_classnames(self, classnames: list[str], templates: str | list[str] = DEFAULT_TEMPLATE) -> None:
        """Shorthand for :meth:`set_label_space` with class names and template(s) only."""
        self.set_label_space(LabelSpace(tuple(classnames), templates))

    def on_label_space(self, space: LabelSpace) -> None:
        """Hook: tokenise prompts, register class-dependent buffers."""

    @property
    def classnames(self) -> list[str]:
        return list(self.label_space.classnames) if self.label_space is not None else []

    def _require_label_space(self) -> LabelSpace:
        if self.label_space is None:
            raise ConfigError(f"method {self.name!r} has no label space yet; call set_label_space / set_classnames")
        return self.label_space

    # ------------------------------------------------------------------ text features
    def invalidate_text_cache(self) -> None:
        self._text_cache = None

    def text_features(self, trace: Trace | None = None) -> Tensor:
        """Class embeddings ``(C, E)`` (not necessarily normalised), cached while nothing can change them.

        Recomputed in training mode, when a trace is asked for, or when gradients could flow to
        learnable tensors; otherwise the cached (detached) value serves every batch.
        """
        self._require_label_space()
        fresh = self.training or trace is not None or (torch.is_grad_enabled() and bool(self.learnable_parameters()))
        if fresh:
            return self.compute_text_features(trace)
        if self._text_cache is None:
            self._text_cache = self.compute_text_features(None).detach()
        return self._text_cache

    def compute_text_features(self, trace: Trace | None = None) -> Tensor:
        """The method's class embeddings; the default is frozen CLIP's (template ensemble)."""
        return self.frozen_text_features()

    def frozen_text_features(self) -> Tensor:
        """L2-normalised frozen CLIP class embeddings ``(C, E)`` over the label space's templates, once per space."""
        space = self._require_label_space()
        if self._frozen_text is None or self._frozen_text[0] != space:
            self._frozen_text = (space, frozen_class_embeddings(self.backbone, space))
        return self._frozen_text[1]

    @property
    def logit_scale(self) -> float:
        """The temperature CLIP was trained with, ``exp(logit_scale)``; methods may fix their own."""
        return float(self.backbone.logit_scale.exp())

    # ------------------------------------------------------------------ interface
    def check_classnames(self, classnames: list[str], rule: str) -> None:
        """Refuse class names the learned prompt cannot serve under inference ``rule`` (see :meth:`serves`)."""
        reason = self.serves(classnames, rule)
        if reason:
            raise CheckpointError(reason)

    def serves(self, classnames: list[str], rule: str) -> str | None:
        """``None`` when the learned prompt can classify ``classnames`` under ``rule``, else why not.

        The ``seen`` rule (e.g. MMRL++'s fused logits) is only meaningful for the classes the
        prompt was trained on, and a class-specific prompt only for exactly those.
        """
        trained, source = self.trained_classnames, self.trained_source
        if trained is None or list(classnames) == list(trained):
            return None
        if self.traits.class_specific:
            return (f"class names do not match {source}: method {self.name!r} learns one prompt per class and was "
                    f"trained on {len(trained)} classes {_preview(trained)}, but {len(classnames)} classes were given "
                    f"{_preview(classnames)}; pass the training classes in their order")
        if rule == "seen" and not set(classnames) <= set(trained):
            unknown = [c for c in classnames if c not in set(trained)]
            return (f"class names do not match {source}: the 'seen' rule is for the {len(trained)} classes the prompt "
                    f"was trained on, but {len(unknown)} given classes are not among them {_preview(unknown)}; "
                    "evaluate other classes with the 'unseen' or 'any' rule")
        return None

    def fit(self, train: DataLoader, val: DataLoader | None) -> dict | None:
        """Hook for methods fitted by their own solver (a linear probe's logistic regression).

        Args:
            train, val: ``(image, label)`` batches of the training classes, without augmentation.

        Returns:
            Statistics of the fit, or ``None`` (the default) to be trained by the gradient trainer.
        """
        return None

    @abc.abstractmethod
    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        """Logits of the inference ``rule`` (``seen``/``unseen``/``any``) for ``(B, 3, H, W)`` images."""

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        """Named loss terms for one batch; the key ``loss`` is what is back-propagated."""
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images, rule="seen").logits, labels)
        return {"loss": loss, "ce": loss.detach()}

    @torch.no_grad()
    def predict(self, images: Tensor, rule: str = "any") -> Tensor:
        """Logits ``(B, C)`` of the method's inference rule (``seen`` / ``unseen`` / ``any``)."""
        return self(images, rule=check_rule(rule)).logits

    def logits_from_image_features(self, features: Tensor, rule: str = "any") -> Tensor:
        """Logits ``(B, C)`` from frozen image features ``(B, E)`` (``backbone.encode_image(images).features``);
        only for methods with ``frozen_image_features``."""
        raise TypeError(f"method {self.name!r} does not classify from frozen image features")

    def on_epoch_start(self, state: StepState) -> None:
        """Hook called before each training epoch (e.g. Nemesis's ω schedule)."""

    def on_epoch_end(self, state: StepState) -> None:
        """Hook called after each training epoch (e.g. PromptSRC's prompt averaging)."""

    # ------------------------------------------------------------------ test-time settings
    @contextlib.contextmanager
    def overridden(self, values: dict | None):
        """Temporarily replace config fields (test-time knobs), validated like any config."""
        if not values:
            yield self
            return
        saved = self.config
        self.config = make_config(self.name, {**dataclasses.asdict(saved), **values})
        self.invalidate_text_cache()
        try:
            yield self
        finally:
            self.config = saved
            self.invalidate_text_cache()

    def train(self, mode: bool = True):
        self.invalidate_text_cache()  # learned values may change from here on
        return super().train(mode)

    # ------------------------------------------------------------------ state
    def set_trained_classnames(self, classnames: list[str], run_dir) -> None:
        """Record the classes the learned prompt (saved in ``run_dir``) was trained on."""
        self.trained_classnames, self.trained_source = list(classnames), f"the prompt trained in {run_dir}"

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def saved_parameters(self) -> dict[str, nn.Parameter]:
        """The tensors a run keeps, by name: the learnable ones (a method may keep frozen ones it uses too)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def learnable_state_dict(self) -> dict[str, Tensor]:
        """Only the saved tensors, by name; class-dependent buffers are not included."""
        return {n: p.detach().clone() for n, p in self.saved_parameters().items()}

    def load_learnable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Load saved tensors, strictly: every key present, every shape right."""
        own = self.saved_parameters()
        mismatch = state_mismatch(own, state)
        if mismatch:
            raise CheckpointError(f"{source} does not fit method {self.name!r} on this backbone: {mismatch}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.dtype))
        self.invalidate_text_cache()


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a ``Method`` subclass available under ``name``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        if not isinstance(cls.__dict__.get("traits", cls.traits), MethodTraits):
            raise TypeError(f"method {name!r}: 'traits' must be a MethodTraits, not {type(cls.traits).__name__}")
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


def check_config_keys(name: str, keys) -> None:
    """Refuse keys that are not fields of method ``name``'s config, with suggestions."""
    fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    for key in keys:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(fields)) or "none: it has no settings"
            raise ConfigError(f"unknown key {key!r} for method {name!r}{hint} (valid: {valid})")


def make_config(name: str, values: dict | None = None) -> MethodConfig:
    """Build method ``name``'s config from a dict, naming unknown keys with suggestions."""
    values = dict(values or {})
    check_config_keys(name, values)
    return get_method_class(name).Config(**values)


def create_method(name: str, backbone: ClipBackbone, config: MethodConfig | dict | None = None) -> Method:
    """Instantiate a registered method on ``backbone``."""
    cls = get_method_class(name)
    if not isinstance(config, MethodConfig):
        config = make_config(name, config)
    return cls(backbone, config)
