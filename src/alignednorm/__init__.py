"""alignednorm: prompt learning for CLIP-like vision-language models.

The Python front door (importing the package loads no torch; these do on first call)::

    import alignednorm
    model = alignednorm.train("alignednorm", "eurosat", data_root="data", clip="ViT-B-16.pt")  # as `alignednorm train`
    model = alignednorm.load("runs/base2new/eurosat/shots16/alignednorm/default/seed1")      # or an exported folder
    model.predict(["a.jpg"], classes=["forest", "river"])      # top-k (label, probability) per image
    model.encode_image(images), model.encode_text(["forest", "river"]), model.logits(images, classes)

Both return an :class:`alignednorm.predict.Predictor`. Methods, protocols and analyses are in
:mod:`alignednorm.methods`, :mod:`alignednorm.protocols` and :mod:`alignednorm.analysis`.
"""

__version__ = "0.1.0"
__all__ = ["Predictor", "load", "train"]


def load(run_dir, clip=None, device="cpu"):
    """Rebuild a trained method from its run folder or exported folder; see :func:`alignednorm.predict.load`."""
    from alignednorm.predict import load as _load

    return _load(run_dir, clip=clip, device=device)


def train(method, dataset, data_root=None, clip=None, **options):
    """Train and evaluate a method as ``alignednorm train`` does; see :func:`alignednorm.predict.train`."""
    from alignednorm.predict import train as _train

    return _train(method, dataset, data_root=data_root, clip=clip, **options)


def __getattr__(name: str):
    if name == "Predictor":
        from alignednorm.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'alignednorm' has no attribute {name!r}")
