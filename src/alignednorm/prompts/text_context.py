"""CoOp's learnable text context (Zhou et al., IJCV 2022, Eq. 2–3), reusable by CoOp, Nemesis and analyses.

The prompt of class ``k`` is ``t_k = [SOS][v_1] … [v_L][CLASS_k][.][EOS]`` (class token at the
``end``), or with the class tokens in the ``middle`` (after ``v_1..v_⌊L/2⌋``) or at the ``front``.
The ``v_j`` live in CLIP's token-embedding space (before the positional embedding). They are one
set shared by every class (unified context) or one set per class (class-specific context, CSC).

Construction, exactly as the official ``PromptLearner`` (KaiyangZhou/CoOp ``trainers/coop.py``,
ShyFoo/Nemesis ``trainers/coop_nemesis.py``): each class's prompt is tokenised as the string
``"{prefix} {class name}."`` where ``prefix`` is ``"X X … X"`` (L placeholders, random init) or the
init phrase (word init); its frozen token embeddings give the two buffers ``token_prefix`` (the SOS
embedding) and ``token_suffix`` (class tokens, '.', EOS and padding). The EOS is pooled at the
argmax of those token ids. The buffers are rebuilt from the current class names and never saved,
so a unified context serves any class list (base → new, cross-dataset).

Names (paper ↔ official ↔ here): ``[v]_1..[v]_M`` ↔ ``prompt_learner.ctx`` ↔ ``TextContext.ctx``;
M ↔ ``N_CTX`` ↔ ``n_ctx``; CSC ↔ ``CSC`` ↔ ``class_specific``; ``CLASS_TOKEN_POSITION`` ↔
``position``; ``CTX_INIT`` ↔ ``ctx_init``.

Deviation: with word init the official code sets L to the number of *words* of the phrase; we
count its BPE tokens (the same for phrases of one-token words such as "a photo of a"). The
official code ignores CSC under word init; here a class-specific context starts every class
from the phrase.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from alignednorm.errors import CheckpointError, ConfigError

POSITIONS = ("end", "middle", "front")


def init_from_words(backbone, phrase: str) -> tuple[Tensor, str]:
    """The token embeddings ``(n, W)`` of ``phrase`` (its BPE tokens between SOS and EOS), and the phrase."""
    phrase = phrase.replace("_", " ").strip()
    ids = backbone.tokenize([phrase])
    n = int(ids[0].argmax()) - 1  # tokens between SOS and EOS
    if n < 1:
        raise ConfigError(f"ctx_init = {phrase!r} has no tokens; give words or ctx_init='' (random init)")
    weight = backbone.token_embedding.weight
    with torch.no_grad():
        vectors = backbone.token_embedding(ids.to(weight.device))[0, 1 : 1 + n]
    return vectors.float().cpu().clone(), phrase


def layout_index(name_lens: Sequence[int], n_ctx: int, length: int, position: str) -> Tensor:
    """Per class, where each output position reads from the ``end`` layout ``[SOS, ctx, suffix]``.

    Returns ``(C, T)`` indices: ``end`` is the identity; ``front`` gives ``[SOS, class, ctx, rest]``;
    ``middle`` gives ``[SOS, ctx[:L//2], class, ctx[L//2:], rest]`` (official ``half_n_ctx = n_ctx // 2``).
    """
    rows = []
    half = n_ctx // 2
    for n in name_lens:
        sos, ctx = [0], list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + n))
        rest = list(range(1 + n_ctx + n, length))
        if position == "end":
            rows.append(sos + ctx + name + rest)
        elif position == "front":
            rows.append(sos + name + ctx + rest)
        else:
            rows.append(sos + ctx[:half] + name + ctx[half:] + rest)
    return torch.tensor(rows, dtype=torch.long)


class TextContext(nn.Module):
    """CoOp's context vectors plus the per-class token buffers that surround them.

    Args:
        backbone: the :class:`~alignednorm.backbone.clip.ClipBackbone` (read for its width, tokenizer
            and token embeddings; not kept).
        n_ctx: context length L with random init (ignored with ``ctx_init``: L is the phrase's token count).
        ctx_init: words whose token embeddings initialise the context (official CTX_INIT); empty:
            N(0, ``std``²) vectors.
        class_specific: one context per class (CSC); its class count is fixed by the first class
            list (or by a loaded checkpoint), and other class lists are refused.
        position: class tokens at the ``end``, in the ``middle`` or at the ``front``.
        std: standard deviation of the random init (0.02 in CoOp).

    Attributes:
        ctx: the learnable context, ``(L, W)`` unified or ``(C, L, W)`` class-specific
            (``(0, L, W)`` until the classes are known).
        token_ids: ``(C, T)`` ids of ``"{prefix} {class}."`` (EOS pooled at their argmax).
        token_prefix, token_suffix: ``(C, 1, W)`` SOS and ``(C, T − 1 − L, W)`` frozen embeddings.
    """

    def __init__(self, backbone, n_ctx: int = 16, ctx_init: str = "", class_specific: bool = False,
                 position: str = "end", std: float = 0.02):
        super().__init__()
        if position not in POSITIONS:
            raise ConfigError(f"class_token_position = {position!r}; expected one of {POSITIONS}")
        if ctx_init:
            vectors, self.prompt_prefix = init_from_words(backbone, ctx_init)
        else:
            if n_ctx < 1:
                raise ConfigError(f"n_ctx = {n_ctx}; expected at least 1 context vector")
            vectors = torch.empty(n_ctx, backbone.text_width).normal_(std=std)
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx, self.width = vectors.shape
        self.class_specific, self.position, self.std = class_specific, position, std
        self.word_init = bool(ctx_init)
        device = backbone.token_embedding.weight.device
        self.register_buffer("init_vectors", vectors.to(device), persistent=False)
        shape = (0, self.n_ctx, self.width) if class_specific else (self.n_ctx, self.width)
        self.ctx = nn.Parameter(vectors.to(device).clone() if not class_specific
                                else vectors.new_empty(shape).to(device))
        self.classnames: tuple[str, ...] = ()

    # ------------------------------------------------------------------ classes
    @property
    def num_classes(self) -> int:
        """Classes the class-specific context holds (0 before it is sized; -1 for a unified context)."""
        return self.ctx.shape[0] if self.class_specific else -1

    def resize_classes(self, count: int) -> None:
        """Give a class-specific context ``count`` classes, freshly initialised (only while it has none)."""
        if not self.class_specific or self.ctx.shape[0] == count:
            return
        if self.ctx.shape[0]:
            raise CheckpointError(f"the class-specific context holds {self.ctx.shape[0]} classes; {count} were given "
                                  "(a context per class only serves the class list it was trained on)")
        base = self.init_vectors
        if self.word_init:
            values = base.unsqueeze(0).repeat(count, 1, 1)  # every class starts from the phrase
        else:
            values = torch.empty(count, self.n_ctx, self.width).normal_(std=self.std).to(base.device)
        self.ctx = nn.Parameter(values)

    def set_classnames(self, backbone, classnames: Sequence[str]) -> None:
        """Tokenise ``"{prefix} {class}."`` for every class and rebuild the frozen buffers."""
        names = [c.replace("_", " ") for c in classnames]
        self.resize_classes(len(names))
        ids = backbone.tokenize([f"{self.prompt_prefix} {name}." for name in names])
        name_lens = [len(backbone.tokenizer.encode(name)) for name in names]
        weight = backbone.token_embedding.weight
        ids = ids.to(weight.device)
        with torch.no_grad():
            embedding = backbone.token_embedding(ids)  # (C, T, W)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx :], persistent=False)
        index = layout_index(name_lens, self.n_ctx, ids.shape[1], self.position).to(weight.device)
        self.register_buffer("layout", index, persistent=False)
        self.classnames = tuple(classnames)

    def _require_classes(self) -> None:
        if not hasattr(self, "token_ids"):
            raise ConfigError("the text context has no class names yet; call set_classnames first")

    # ------------------------------------------------------------------ prompts
    def embeddings(self, ctx: Tensor | None = None) -> Tensor:
        """Prompt token embeddings ``(C, T, W)`` (before the positional embedding).

        Args:
            ctx: context to use instead of ``self.ctx`` (e.g. a corrupted copy): ``(L, W)`` or ``(C, L, W)``.
        """
        self._require_classes()
        ctx = self.ctx if ctx is None else ctx
        prefix, suffix = self.token_prefix, self.token_suffix
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)  # (C, L, W)
        x = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)  # (C, T, W), class tokens at the end
        if self.position != "end":  # move the class tokens (per class: names differ in length)
            x = x.gather(1, self.layout.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x

    def forward(self, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(embeddings (C, T, W), token_ids (C, T))`` for the text encoder."""
        return self.embeddings(ctx), self.token_ids

    def load_shape(self, ctx: Tensor) -> None:
        """Size an unsized class-specific context like a checkpoint's ``(C, L, W)`` tensor before loading it."""
        if self.class_specific and self.ctx.shape[0] == 0 and ctx.dim() == 3 and ctx.shape[1:] == self.ctx.shape[1:]:
            self.ctx = nn.Parameter(torch.zeros(ctx.shape, device=self.ctx.device, dtype=self.ctx.dtype))
