"""PromptSRC's mutual-agreement self-regularisation towards frozen CLIP (Khattak et al., ICCV 2023, §3.2).

``L_SCL = λ1 · L_SCL-text + λ2 · L_SCL-image + L_SCL-logits`` (Eq. 3–6), added to the
cross-entropy (Eq. 8). As the official ``forward_backward`` computes them:

* ``L_SCL-text`` = mean |w̃ − w| over C×E elements: prompted normalised text features against the
  frozen ones, which are the template **mean of unnormalised** features, normalised afterwards
  (``fixed_embeddings``);
* ``L_SCL-image`` = mean |f̃ − f| over B×E elements, frozen image features normalised;
* ``L_SCL-logits`` = Σ p_zs (log p_zs − log p̃) over batch *and* classes, divided by B·C
  (``F.kl_div(..., reduction="sum") / logits.numel()``), temperature 1.

Official names: ``TEXT_LOSS_WEIGHT`` = λ1 (25), ``IMAGE_LOSS_WEIGHT`` = λ2 (10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l1_to_frozen(features: Tensor, frozen: Tensor) -> Tensor:
    """Mean absolute difference over every element (``F.l1_loss``, reduction ``mean``)."""
    return F.l1_loss(features, frozen, reduction="mean")


def logit_kl_sum(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``Σ p_teacher (log p_teacher − log p)`` over all rows and classes (softmax at ``temperature``)."""
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="sum", log_target=True)


def mutual_agreement(text: Tensor, frozen_text: Tensor, image: Tensor, frozen_image: Tensor, logits: Tensor,
                     teacher_logits: Tensor, text_weight: float, image_weight: float) -> dict[str, Tensor]:
    """The three self-consistency terms, raw and weighted, with the official order of operations.

    Args:
        text, frozen_text: ``(C, E)`` normalised prompted / frozen class embeddings.
        image, frozen_image: ``(B, E)`` normalised prompted / frozen image features.
        logits, teacher_logits: ``(B, C)`` prompted and zero-shot logits.
        text_weight, image_weight: λ1 and λ2.

    Returns:
        ``l1_text``, ``l1_image``, ``kl_sum`` (raw), ``scl_text``, ``scl_image``, ``scl_logits``
        (weighted) and their sum ``scl``.
    """
    l1_text, l1_image = l1_to_frozen(text, frozen_text), l1_to_frozen(image, frozen_image)
    kl_sum = logit_kl_sum(logits, teacher_logits)
    scl_text, scl_image = l1_text * text_weight, l1_image * image_weight
    scl_logits = kl_sum * (1 * 1) / logits.numel()  # T² = 1
    scl = scl_logits + scl_text + scl_image
    return {"l1_text": l1_text, "l1_image": l1_image, "kl_sum": kl_sum, "scl_text": scl_text,
            "scl_image": scl_image, "scl_logits": scl_logits, "scl": scl}


@torch.no_grad()
def template_mean_text_features(backbone, classnames: list[str] | tuple[str, ...], templates: tuple[str, ...],
                                chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Frozen CLIP class embeddings averaged over templates **before** normalisation (PromptSRC's teacher).

    Returns:
        ``(mean (C, E), per_template (K, C, E))``, neither normalised; class names have ``_`` read
        as spaces.
    """
    device = backbone.token_embedding.weight.device
    names = [c.replace("_", " ") for c in classnames]
    per_template = []
    for template in templates:
        prompts = [template.replace("{}", name) for name in names]
        parts = [backbone.encode_text(backbone.tokenize(prompts[i : i + chunk]).to(device)).features
                 for i in range(0, len(prompts), chunk)]
        per_template.append(torch.cat(parts))  # (C, E)
    stacked = torch.stack(per_template)  # (K, C, E)
    return stacked.mean(dim=0), stacked
