"""MMRL (Guo & Gu, CVPR 2025): MMRL++'s predecessor, from the same official repository.

Differences from MMRL++ (specs/mmrlpp.md §1.2–1.5): an independent full linear aligner per
prompted layer, plain replacement at later layers (no progressive mixing), and a separate full
projection for the representation branch, randomly initialised as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignednorm.methods.base import MethodTraits, register_method
from alignednorm.methods.mmrlpp import OFFICIAL_NAMES, MMRLpp, RepresentationConfig
from alignednorm.prompts.representation import LinearAligner


@register_method("mmrl")
class MMRL(MMRLpp):
    """MMRL with the decoupled (official) or unified inference rule."""

    traits = MethodTraits(official_names=OFFICIAL_NAMES, citation="""@inproceedings{guo2025mmrl,
  title = {MMRL: Multi-Modal Representation Learning for Vision-Language Models},
  author = {Guo, Yuncheng and Gu, Xiaodong}, booktitle = {CVPR}, year = {2025}}""")


    @dataclass
    class Config(RepresentationConfig):
        """MMRL settings: the shared ones (MMRL replaces tokens at later layers, full aligners and projection)."""

    @property
    def prc_beta(self) -> float:
        return 1.0  # plain replacement at the layers after J

    def build_aligners(self) -> None:
        cfg, bb = self.config, self.backbone
        self.vision_aligner = LinearAligner(len(cfg.rep_layers), cfg.rep_dim, bb.vision_width)
        self.text_aligner = LinearAligner(len(cfg.rep_layers), cfg.rep_dim, bb.text_width)

    def build_rep_projection(self) -> None:
        width, embed = self.backbone.vision_width, self.backbone.embed_dim
        self.proj_rep = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def project_rep(self, pooled: Tensor) -> Tensor:
        return pooled @ self.proj_rep
