"""How a method edits a tower's token sequence between blocks, and what the backbone records.

A method passes a *prompt hook*: a callable ``hook(layer) -> LayerPrompt | None`` asked before
every block (layers count from 1). The backbone applies the answer with :func:`splice` and keeps
the bookkeeping (where the prompts sit, how many tokens were inserted before the text EOT).

| mode    | effect at the prompt positions                   | methods           |
|---------|--------------------------------------------------|-------------------|
| insert  | new tokens put in at ``at``                      | MMRL, MMRL++ (J)  |
| replace | the tokens already there are overwritten         | VPT, IVLP, MaPLe  |
| blend   | ``beta * new + (1 - beta) * previous output``    | MMRL++ (l > J)    |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("insert", "replace", "blend")


@dataclass
class LayerPrompt:
    """Tokens to put into a tower's sequence before one block.

    Attributes:
        tokens: ``(n, W)`` shared by the batch, or ``(B, n, W)`` per sample.
        mode: ``"insert"``, ``"replace"`` or ``"blend"``.
        at: first prompt position; negative counts from the end (MaPLe appends its tokens).
            For ``replace``/``blend`` the position of the tokens inserted earlier is used
            when ``at`` is ``None``.
        beta: weight of the new tokens in ``blend`` mode.
    """

    tokens: Tensor
    mode: str = "insert"
    at: int | None = 1
    beta: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LayerPrompt.mode must be one of {MODES}, got {self.mode!r}")


PromptHook = Callable[[int], "LayerPrompt | None"]


@dataclass
class PromptState:
    """Where prompt tokens sit in the sequence: ``start`` and count ``n`` (0 when none)."""

    start: int = 0
    n: int = 0


def splice(x: Tensor, prompt: LayerPrompt, state: PromptState) -> Tensor:
    """Apply ``prompt`` to the sequence ``x`` ``(B, T, W)`` and update ``state``."""
    tokens = prompt.tokens.to(x.dtype)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, n, W)
    n = tokens.shape[1]
    if prompt.mode == "insert":
        at = prompt.at if prompt.at >= 0 else x.shape[1] + 1 + prompt.at
        state.start, state.n = at, n
        return torch.cat([x[:, :at], tokens, x[:, at:]], dim=1)
    at = state.start if prompt.at is None else (prompt.at if prompt.at >= 0 else x.shape[1] + prompt.at)
    if prompt.mode == "blend":
        tokens = prompt.beta * tokens + (1.0 - prompt.beta) * x[:, at : at + n]
    return torch.cat([x[:, :at], tokens, x[:, at + n :]], dim=1)


@dataclass
class Trace:
    """What a tower recorded on its way through the blocks.

    Set the ``record_*`` flags (and ``layers``) before the forward; the backbone fills the dicts,
    keyed by the 1-based layer number.

    Attributes:
        record_hidden: keep every recorded block's output ``(B, T, W)`` in ``hidden``.
        record_attn_out: keep the attention branch ``attn(ln_1(x))`` in ``attn_out``.
        attention_layers: layers whose attention probabilities ``(B, heads, T, T)`` go in ``attention``.
        layers: the layers whose hidden states / attention branch are kept (``None``: every layer),
            as open_clip's ``forward_intermediates(indices=...)``.
        positions: ``{layer: (start, count)}``: where the prompt tokens sat in that block's input
            and output, for every layer run, whatever the splice mode (``(0, 0)`` without prompts).
        prompt_start, prompt_count: where the prompt tokens sat after the last block.
    """

    record_hidden: bool = True
    record_attn_out: bool = False
    attention_layers: tuple[int, ...] = ()
    layers: tuple[int, ...] | None = None
    hidden: dict[int, Tensor] = field(default_factory=dict)
    attn_out: dict[int, Tensor] = field(default_factory=dict)
    attention: dict[int, Tensor] = field(default_factory=dict)
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    prompt_start: int = 0
    prompt_count: int = 0

    def keeps(self, layer: int) -> bool:
        """Whether ``layer``'s hidden states are recorded."""
        return self.layers is None or layer in self.layers

    def records_before(self, layer: int) -> bool:
        """Whether anything of a block before ``layer`` would be kept (states, attention branch or weights)."""
        keeps_states = (self.record_hidden or self.record_attn_out) and any(map(self.keeps, range(1, layer)))
        return keeps_states or any(a < layer for a in self.attention_layers)

    def ran_prompt_free(self, layer: int) -> None:
        """Fill in what blocks ``1 .. layer-1`` run without prompts leave here when nothing of them is kept."""
        self.positions.update(dict.fromkeys(range(1, layer), (0, 0)))
        self.prompt_start = self.prompt_count = 0

    def record(self, layer: int, hidden: Tensor, attn_out: Tensor, weights: Tensor | None) -> None:
        """Keep what the flags ask for of one block: output, attention branch, attention probabilities."""
        if self.keeps(layer):
            if self.record_hidden:
                self.hidden[layer] = hidden
            if self.record_attn_out:
                self.attn_out[layer] = attn_out
        if weights is not None:
            self.attention[layer] = weights  # (B, heads, T, T)


@dataclass
class Traces:
    """One :class:`Trace` per tower for a method's forward; ``None`` leaves a tower unrecorded."""

    image: Trace | None = None
    text: Trace | None = None


@dataclass
class Prefix:
    """A tower's sequence entering block ``layer`` (blocks ``1 .. layer-1`` already run).

    Methods whose prompts start at block J compute it once and continue from it, for the
    prompted and for the frozen pass (prefix caching).

    Attributes:
        layer: the first block still to run (1-based).
        states: ``(B, T, W)`` the input of that block.
        prompts: where prompt tokens already sit in ``states``.
    """

    layer: int
    states: Tensor
    prompts: PromptState = field(default_factory=PromptState)
