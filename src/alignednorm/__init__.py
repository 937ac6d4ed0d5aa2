"""alignednorm: prompt learning for CLIP-like vision-language models."""

__version__ = "0.1.0"


def load(run_dir, clip=None, device="cpu"):
    """Rebuild a trained method from its run folder; see :func:`alignednorm.predict.load`."""
    from alignednorm.predict import load as _load

    return _load(run_dir, clip=clip, device=device)
