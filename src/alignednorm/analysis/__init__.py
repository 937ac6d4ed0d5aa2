"""Analyses behind the AlignedNorm and Nemesis papers' figures, as a library.

Compute functions take tensors or arrays and return numpy arrays and floats; they never load runs
or methods. Figures are drawn apart, from those numbers, by :mod:`alignednorm.analysis.plots`
(matplotlib, the ``analysis`` extra), and :mod:`alignednorm.analysis.html_report` writes each
figure's numbers as JSON/CSV and one self-contained HTML page.

| module        | what                                                                       | paper            |
|---------------|----------------------------------------------------------------------------|------------------|
| norms         | r(x) and its summary; per-layer class/prompt token norms; prompt norms     | Fig. 3a, 3b; Nemesis |
| attention     | attention share given to prompt tokens; class-token attention maps          | Fig. 3c, 6, 7    |
| uniformity    | uniformity and tolerance, exact and block-wise                              | Eq. 13, 14; Fig. 5 |
| tsne          | seeded t-SNE of base and new embeddings                                     | Fig. 4           |
"""

from alignednorm.analysis.attention import class_attention_map, prompt_attention_share
from alignednorm.analysis.html_report import FigureEntry, write_numbers, write_report
from alignednorm.analysis.norms import (
    layer_norms,
    norm_ratio,
    prompt_norms_over_epochs,
    prompt_vector_norms,
    ratio_summary,
    summarize,
)
from alignednorm.analysis.tsne import tsne_embed
from alignednorm.analysis.uniformity import DEFAULT_T, embedding_geometry, tolerance, uniformity

__all__ = [
    "DEFAULT_T",
    "FigureEntry",
    "class_attention_map",
    "embedding_geometry",
    "layer_norms",
    "norm_ratio",
    "prompt_attention_share",
    "prompt_norms_over_epochs",
    "prompt_vector_norms",
    "ratio_summary",
    "summarize",
    "tolerance",
    "tsne_embed",
    "uniformity",
    "write_numbers",
    "write_report",
]
