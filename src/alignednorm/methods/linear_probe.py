"""Linear probe (Radford et al., 2021; CoOp's few-shot baseline): logistic regression on frozen image features.

As CoOp's ``lpclip`` scripts do it: features of the frozen image encoder without augmentation and
without normalisation, an L2-regularised multinomial logistic regression (scikit-learn, L-BFGS,
1,000 iterations), its inverse regularisation strength ``C`` chosen on the validation split by
a coarse search over ``1e6 … 1e-6`` followed by ``search_steps`` rounds of a log-space bisection
around the best value; the classifier of the last round is kept. The weights are one row per
class, so a probe only serves the classes it was fitted on (new classes are "not applicable").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignednorm.backbone.hooks import Traces
from alignednorm.errors import ConfigError
from alignednorm.methods.base import Method, MethodConfig, MethodTraits, Outputs, check_range, register_method
from alignednorm.methods.zeroshot import CLIP_CITATION
from alignednorm.prompts.label_space import LabelSpace

log = logging.getLogger(__name__)


@register_method("linear_probe")
class LinearProbe(Method):
    """A linear classifier ``W f(x) + b`` on frozen CLIP image features, fitted by logistic regression."""

    traits = MethodTraits(class_specific=True, frozen_image_features=True, citation=CLIP_CITATION)


    @dataclass
    class Config(MethodConfig):
        """Linear-probe settings (CoOp's ``lpclip/linear_probe.py``).

        Attributes:
            c_grid: the coarse search over ``C`` (inverse L2 strength), best on validation first.
            search_steps: rounds of the log-space bisection around the best coarse ``C``.
            max_iter: L-BFGS iterations per fit.
        """

        c_grid: list[float] = field(default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6])
        search_steps: int = 8
        max_iter: int = 1000

        def validate(self) -> None:
            check_range(self, "search_steps", 0)
            check_range(self, "max_iter", 1)
            if not self.c_grid or min(self.c_grid) <= 0:
                raise ConfigError(f"c_grid = {list(self.c_grid)}; expected positive values")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        device = backbone.logit_scale.device
        self.weight = nn.Parameter(torch.zeros(0, backbone.embed_dim, device=device))  # (C, E), sized per classes
        self.bias = nn.Parameter(torch.zeros(0, device=device))

    def on_label_space(self, space: LabelSpace) -> None:
        if self.trained_classnames is not None:  # a fitted probe serves its own classes only
            self.check_classnames(list(space.classnames), "any")
        elif self.weight.shape[0] != len(space):
            self.resize(len(space))

    def resize(self, classes: int) -> None:
        device = self.weight.device
        self.weight = nn.Parameter(torch.zeros(classes, self.backbone.embed_dim, device=device))
        self.bias = nn.Parameter(torch.zeros(classes, device=device))

    def load_learnable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        if "weight" in state and state["weight"].shape[0] != self.weight.shape[0]:
            self.resize(state["weight"].shape[0])  # the class count comes from the checkpoint
        super().load_learnable_state_dict(state, source)

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        features = self.backbone.encode_image(images, trace=trace.image if trace else None).features
        logits = self.logits_from_image_features(features, rule)
        return Outputs(logits=logits, features=F.normalize(features, dim=-1), branches={"image_features": features})

    def logits_from_image_features(self, features: Tensor, rule: str = "any") -> Tensor:
        return features @ self.weight.t() + self.bias

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def features(self, loader) -> tuple[np.ndarray, np.ndarray]:
        """Frozen, unnormalised image features ``(N, E)`` and labels of a loader."""
        device = self.weight.device
        feats, labels = [], []
        for batch in loader:
            if batch is None:
                continue
            images, y = batch
            feats.append(self.backbone.encode_image(images.to(device)).features.double().cpu())
            labels.append(y)
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()

    def fit(self, train, val) -> dict:
        """CoOp's C search on validation, then the classifier of the last bisection round (see module docs)."""
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            raise ConfigError("linear_probe needs scikit-learn: pip install 'alignednorm[analysis]'") from None
        if val is None:
            raise ConfigError("linear_probe chooses C on the validation split; this dataset has none")
        x, y = self.features(train)
        xv, yv = self.features(val)

        def fitted(c: float):
            model = LogisticRegression(solver="lbfgs", max_iter=self.config.max_iter, C=c).fit(x, y)
            return model, float((model.predict(xv) == yv).mean())

        scores = [fitted(c)[1] for c in self.config.c_grid]
        peak = self.config.c_grid[int(np.argmax(scores))]
        left, right = np.log10(peak) - 1, np.log10(peak) + 1
        model, c_final, acc = fitted(peak)[0], peak, max(scores)
        for _ in range(self.config.search_steps):
            (m_left, a_left), (m_right, a_right) = fitted(10**left), fitted(10**right)
            if a_left < a_right:  # keep the better end, halve the interval towards it (ties: left)
                model, c_final, acc, left = m_right, 10**right, a_right, (left + right) / 2
            else:
                model, c_final, acc, right = m_left, 10**left, a_left, (left + right) / 2
        self.set_classifier(model, int(y.max()) + 1)
        return {"C": float(c_final), "val_accuracy": 100 * acc, "train_images": len(y)}

    def set_classifier(self, model, classes: int) -> None:
        """Copy a fitted scikit-learn classifier into ``weight``/``bias`` (two classes: one row in sklearn)."""
        coef, intercept = torch.as_tensor(model.coef_), torch.as_tensor(model.intercept_)
        if coef.shape[0] == 1:  # binary: p(class 1) = σ(w·x + b), i.e. softmax over [0, w·x + b]
            coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros(1).double(), intercept])
        weight = torch.zeros(classes, coef.shape[1], dtype=torch.float64)
        bias = torch.full((classes,), -1e4, dtype=torch.float64)  # a class absent from training is never predicted
        weight[torch.as_tensor(model.classes_)] = coef
        bias[torch.as_tensor(model.classes_)] = intercept
        with torch.no_grad():
            self.resize(classes)
            self.weight.copy_(weight.float())
            self.bias.copy_(bias.float())
        self.invalidate_text_cache()
