"""Time the official MMRL++ code the way ``alignednorm bench`` times ours (issue #21's side-by-side check).

``python -m alignednorm.compat.bench_official --official-repo MMRL --dassl Dassl.pytorch --clock cpu``
writes the random CLIP that ``alignednorm bench`` builds (:func:`alignednorm.bench.random_clip`) as an
OpenAI-layout state dict, builds the official ``CustomCLIP`` with the official ``MMRLpp.build_model``
(Dassl defaults + the official ``extend_cfg`` + ``configs/trainers/MMRLpp/vit_b16.yaml``, fp32, template
"a photo of a {}."), then times, per class count and median over ``--iters``, the official
``forward_backward`` (frozen CLIP image pass, forward, loss, backward, AdamW step), the first evaluation
batch (class text encoded) and a steady one, on bench's images and labels. It prints bench's table.

The official code is imported from the given checkouts and run as it is, except for setup that is never
timed: the trainer is a bare ``MMRLpp`` holding what ``build_model`` and ``forward_backward`` read (no
data loaders, no logging); the official CLIP download is pointed at the written file (nothing is
downloaded); on the CPU the frozen CLIP's class text features are computed where the model is (the
official helper calls ``.cuda()``); and where Dassl's warm-up LR scheduler fails on a recent torch, a plain
cosine one stands in (it is stepped only after an epoch, never in a timed step). Only our own parts are tested
(tests/test_bench_official.py).

``--alternate`` times the training step only, official and ours in ONE process, in turns (the robust way
to compare on a shared machine: every side sees the same load). Ours runs on the same CLIP (rounded to
float16 values, as the official ``build_model`` casts it), images, labels and learnable start values (the
official ones, loaded through our importer), in two scopes, printed apart: the bare method step
(``training_step`` with its frozen-teacher pass, backward, optimiser step: what the official
``forward_backward`` does) and the full trainer step (``Trainer.fit`` over one batch: autocast context,
finite loss and gradient checks, scaler, logging, loader and epoch hooks). Round ``r`` starts with the
``r``-th side, so over three rounds each side takes every place once. Wall and process CPU seconds are
read on the same steps; the load average is recorded around every class count.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import io
import json
import os
import resource
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.bench import CLOCKS, GEOMETRIES, BenchResult, Timing, _median, format_result, make_clock, random_clip
from alignednorm.errors import AlignedNormError, CheckpointError, ConfigError

OFFICIAL_URL = "github.com/yunncheng/MMRL"
# What the harness imports or reads from the official checkout; the first missing one is named.
OFFICIAL_FILES = ("trainers/mmrlpp.py", "clip/clip.py", "clip/model_mmrlpp.py", "train.py",
                  "configs/trainers/MMRLpp/vit_b16.yaml")
DASSL_FILE = "dassl/engine/trainer.py"
# Top-level names the official checkout uses; an earlier import of another package under one would win.
_OFFICIAL_MODULES = ("clip", "trainers", "datasets", "train")
_SIZE_KEYS = ("input_resolution", "context_length", "vocab_size")  # carried by OpenAI's archives
TEMPLATE_DATASET = "ImageNet"  # its official template is bench's "a photo of a {}."


def check_official_repo(path: str | Path | None) -> Path:
    """The official MMRL checkout at ``path``, or a one-line :class:`ConfigError` naming the file it lacks."""
    if path is None:
        raise ConfigError(f"--official-repo is required: a checkout of {OFFICIAL_URL}")
    repo = Path(path)
    if not repo.is_dir():
        raise ConfigError(f"--official-repo {repo}: no such folder (expected a checkout of {OFFICIAL_URL})")
    missing = next((name for name in OFFICIAL_FILES if not (repo / name).is_file()), None)
    if missing:
        raise ConfigError(f"--official-repo {repo}: not the official MMRL checkout ({OFFICIAL_URL}): "
                          f"{missing} is missing")
    return repo.resolve()


def check_dassl(path: str | Path | None) -> Path | None:
    """The Dassl.pytorch checkout at ``path`` (``None``: use an installed ``dassl``)."""
    if path is None:
        return None
    root = Path(path)
    if not (root / DASSL_FILE).is_file():
        raise ConfigError(f"--dassl {root}: not a Dassl.pytorch checkout (github.com/KaiyangZhou/Dassl.pytorch): "
                          f"{DASSL_FILE} is missing")
    return root.resolve()


def official_weights(backbone: ClipBackbone) -> dict[str, torch.Tensor]:
    """The CLIP's weights in OpenAI's layout, with the archive's size entries.

    The size entries make our loader read the file as OpenAI's (QuickGELU); the official
    ``build_model`` deletes them.
    """
    state = {name: value.detach().cpu().clone() for name, value in backbone.model.state_dict().items()}
    state["input_resolution"] = torch.tensor(backbone.image_size)
    state["context_length"] = torch.tensor(state["positional_embedding"].shape[0])
    state["vocab_size"] = torch.tensor(state["token_embedding.weight"].shape[0])
    return state


def write_official_weights(backbone: ClipBackbone, path: str | Path) -> Path:
    """Save :func:`official_weights` with ``torch.save``: not TorchScript, so the official ``load_clip_to_cpu``
    falls back from ``torch.jit.load`` to ``torch.load`` (a plain state dict), as for a converted checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_weights(backbone), path)
    return path


def _file_under(module: ModuleType, root: Path) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().is_relative_to(root)


def import_official(repo: Path, dassl: Path | None) -> SimpleNamespace:
    """Import the official ``train`` (config), ``trainers.mmrlpp`` and Dassl from the checkouts."""
    for name in _OFFICIAL_MODULES:
        module = sys.modules.get(name)
        if module is not None and not _file_under(module, repo):
            raise ConfigError(f"a module {name!r} is already imported from {getattr(module, '__file__', '?')}; "
                              "run the official benchmark in a fresh process")
    for root in (dassl, repo):  # the checkout first: its clip / datasets / trainers shadow installed packages
        if root is not None and str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda.amp deprecations in the official imports
            train = importlib.import_module("train")
            mmrlpp = importlib.import_module("trainers.mmrlpp")
            dassl_config = importlib.import_module("dassl.config")
            dassl_engine = importlib.import_module("dassl.engine")
    except ImportError as exc:
        hint = "" if dassl else "; pass --dassl PATH to a Dassl.pytorch checkout"
        raise ConfigError(f"importing the official MMRL code failed: {exc} (Dassl imports yacs, tabulate, gdown, "
                          f"wilds: pip install what is missing{hint})") from exc
    if not _file_under(mmrlpp, repo):
        raise ConfigError(f"trainers.mmrlpp was imported from {mmrlpp.__file__}, not from --official-repo {repo}")
    return SimpleNamespace(train=train, mmrlpp=mmrlpp, clip=mmrlpp.clip, get_cfg_default=dassl_config.get_cfg_default,
                           TrainerBase=dassl_engine.TrainerBase)


def official_config(official: SimpleNamespace, repo: Path, image_size: int):
    """The official MMRL++ config as train.py assembles it for ``vit_b16.yaml``, in fp32.

    The per-dataset table of ``trainers/config.py`` is not applied: it changes BETA / REG_WEIGHT only,
    not what a step computes, and the yaml's defaults are the ones bench's method uses.
    """
    cfg = official.get_cfg_default()
    official.train.extend_cfg(cfg)
    cfg.merge_from_file(str(repo / "configs/trainers/MMRLpp/vit_b16.yaml"))
    cfg.TRAINER.NAME = "MMRLpp"
    cfg.DATASET.NAME = TEMPLATE_DATASET
    cfg.TRAINER.MMRLpp.PREC = "fp32"  # bench times fp32; the yaml's "amp" needs CUDA
    cfg.INPUT.SIZE = (image_size, image_size)  # asserted equal to the CLIP's resolution
    cfg.freeze()
    return cfg


@contextlib.contextmanager
def _replaced(module: ModuleType, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _zero_shot_text_features_here(official: SimpleNamespace):
    """The official ``_get_text_base_features_zero_shot`` computation, on the device the encoder is on."""

    def features(cfg, classnames, clip_model, text_encoder):
        template = official.mmrlpp.CUSTOM_TEMPLATES[cfg.DATASET.NAME]
        tokens = torch.cat([official.clip.tokenize(template.format(c.replace("_", " "))) for c in classnames])
        with torch.no_grad():
            return text_encoder(clip_model.token_embedding(tokens).type(clip_model.dtype), tokens)

    return features


def _scheduler_or_cosine(build):
    """Dassl's ``build_lr_scheduler``, or a plain cosine schedule where Dassl's warm-up wrapper cannot be built.

    That wrapper passes ``verbose`` to torch's ``LRScheduler``, which torch >= 2.7 no longer takes. The
    schedule is stepped only after an epoch's last batch, never inside a timed step.
    """

    def build_or_cosine(optimizer, optim_cfg):
        try:
            return build(optimizer, optim_cfg)
        except TypeError:
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(optim_cfg.MAX_EPOCH))

    return build_or_cosine


def build_official_trainer(official: SimpleNamespace, cfg, classnames: list[str], weights: Path,
                           device: torch.device):
    """An official ``MMRLpp`` trainer after its own ``build_model``, without Dassl's data manager."""
    mmrlpp = official.mmrlpp
    trainer = mmrlpp.MMRLpp.__new__(mmrlpp.MMRLpp)  # TrainerX.__init__ would build the datasets
    official.TrainerBase.__init__(trainer)  # the model / optimiser registries
    trainer.cfg, trainer.device = cfg, device
    trainer.dm = SimpleNamespace(dataset=SimpleNamespace(classnames=classnames))
    trainer.batch_idx, trainer.num_batches = 0, 2  # forward_backward steps the LR only at an epoch's last batch
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(official.clip, "_download", lambda url, root=None: str(weights)))
        stack.enter_context(_replaced(mmrlpp, "build_lr_scheduler", _scheduler_or_cosine(mmrlpp.build_lr_scheduler)))
        if device.type != "cuda":
            stack.enter_context(_replaced(mmrlpp, "_get_text_base_features_zero_shot",
                                          _zero_shot_text_features_here(official)))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # its progress prints would break --json
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load's deprecation, on the fallback
        trainer.build_model()
    return trainer


def weight_problems(trainer, state: dict[str, torch.Tensor]) -> list[str]:
    """Frozen CLIP tensors of the official models that differ from ``state`` (the official loader is not strict).

    The official ``build_model`` casts to fp16 before loading and the fp32 trainer casts back, so a tensor
    may also equal the file's rounded to fp16.
    """
    official = {**{f"visual.{k}": v for k, v in trainer.image_encoder_clip.state_dict().items()},
                **{f"visual.{k.removeprefix('image_encoder.')}": v for k, v in trainer.model.state_dict().items()
                   if k.startswith("image_encoder.")},
                **{k.removeprefix("text_encoder."): v for k, v in trainer.model.state_dict().items()
                   if k.startswith("text_encoder.")}}
    problems = []
    for name, value in official.items():
        if name in ("visual.A", "visual.B"):  # the projection adapter: learnable, not in CLIP
            continue
        ours = state.get(name)
        if ours is None:
            problems.append(f"{name}: not in the file")
        elif not (torch.equal(value.cpu(), ours) or torch.equal(value.cpu(), ours.half().float())):
            problems.append(f"{name}: differs from the file")
    # The token embedding stays outside the models: it made the class prompts' embeddings.
    embedded = state["token_embedding.weight"][trainer.model.tokenized_prompts.cpu()]
    if not torch.equal(trainer.model.prompt_embeddings.cpu(), embedded):
        problems.append("token_embedding.weight: the class prompts were embedded with other weights")
    expected = {k for k in state if k not in (*_SIZE_KEYS, "token_embedding.weight", "logit_scale")}
    problems += [f"{name}: not loaded" for name in sorted(expected - set(official))]
    return problems


def time_official(trainer, images: torch.Tensor, labels: torch.Tensor, iters: int, clock
                  ) -> tuple[float, float, float]:
    """Median seconds of the official training step, first evaluation batch and steady evaluation batch."""
    batch = {"img": images, "label": labels}
    train, first, steady = [], [], []
    for _ in range(iters):
        trainer.set_model_mode("train")
        start = clock()
        trainer.forward_backward(batch)
        train.append(clock() - start)
        trainer.set_model_mode("eval")
        # The official cache of class text features is filled by the first eval batch and never dropped.
        trainer.model.text_features_for_inference = None
        with torch.no_grad():  # as the official test()
            start = clock()
            trainer.model(images)
            first.append(clock() - start)
            start = clock()
            trainer.model(images)
            steady.append(clock() - start)
    return _median(train), _median(first), _median(steady)


def _fingerprint(repo: Path) -> dict[str, str]:
    """Which official version was timed: sha256 (16 hex digits) of the files the harness runs."""
    return {name: hashlib.sha256((repo / name).read_bytes()).hexdigest()[:16] for name in OFFICIAL_FILES[:3]}


def run_official_bench(official_repo: str | Path, dassl: str | Path | None = None, geometry: str = "vit-b16",
                       classes=(50,), batch: int = 8, iters: int = 2, device: str = "cpu", clock: str = "wall",
                       weights_out: str | Path | None = None) -> dict:
    """Time the official MMRL++ per class count; returns bench's result fields plus ``peak_rss_mb`` and
    ``official`` (the checkout and a fingerprint of its files)."""
    repo, dassl_root = check_official_repo(official_repo), check_dassl(dassl)
    dev = torch.device(device)
    timer = make_clock(dev, clock)
    backbone = random_clip(geometry)  # refuses an unknown geometry
    official = import_official(repo, dassl_root)
    image_size = backbone.image_size
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_official_weights(backbone, Path(weights_out) if weights_out else Path(tmp) / "clip.pt")
        del backbone  # the official side holds its own copies
        gc.collect()
        cfg = official_config(official, repo, image_size)
        result = BenchResult("mmrlpp (official)", geometry, batch, device, clock)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(dev)
        for n_classes in classes:
            labels = (torch.arange(batch) % n_classes).to(dev)
            torch.manual_seed(0)
            trainer = build_official_trainer(official, cfg, [f"class {i}" for i in range(n_classes)], weights, dev)
            # Read back mapped and dropped before timing: no third copy of the CLIP in the peak memory.
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            problems = weight_problems(trainer, state)
            del state
            if problems:
                raise CheckpointError("the official build_model did not take the random CLIP: "
                                      f"{'; '.join(problems[:4])}")
            result.params["mmrlpp (official)"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            train_s, first_s, steady_s = time_official(trainer, images, labels, iters, timer)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result.timings.append(Timing(n_classes, {}, train_s, first_s, steady_s, rss,
                                         torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None))
            del trainer
            gc.collect()
    return {**result.as_dict(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "official": {"repo": str(repo), "dassl": str(dassl_root) if dassl_root else None,
                         "sha256": _fingerprint(repo), "weights": str(weights_out) if weights_out else None}}


def format_official(report: dict) -> str:
    """bench's table for the official code (one row per class count), then its peak RSS and checkout."""
    fields = {k: report[k] for k in ("method", "geometry", "batch", "device", "clock", "params")}
    result = BenchResult(**fields, timings=[Timing(**t) for t in report["timings"]])
    table = format_result(result).split("\n")
    table[0] = (f"{result.method} on {result.geometry} ({result.device}, batch {result.batch}): {result.clock} seconds "
                "per iteration; none of our optimisations (compare with bench's 'none' rows); peak memory so far")
    rss = (f"peak RSS of this process: {report['peak_rss_mb']:.0f} MB (two CLIPs per class count, as the official "
           "build_model loads them)")
    return "\n".join([*table, rss,
                      f"official code: {report['official']['repo']} (sha256 {report['official']['sha256']})"])


# The sides --alternate times, in this order in round 0, and what each one's seconds cover.
SIDES = ("official", "ours-step", "ours-trainer")
SCOPES = {
    "official": "official forward_backward: frozen CLIP image pass, forward, loss, backward, AdamW step, loss.item()",
    "ours-step": "ours, bare method step (the official scope): training_step (forward, frozen-teacher pass, loss), "
                 "backward, AdamW step",
    "ours-trainer": "ours, full trainer step: Trainer.fit over this one batch (loader, autocast context, the "
                    "method step, finite loss and gradient checks, scaler, logged terms, epoch hooks)",
}


def alternation_schedule(sides, rounds: int) -> list[str]:
    """Every side once per round; round ``r`` starts with side ``r mod n``, so over ``n`` rounds each side
    takes every place in a round once (first, after the others, ...)."""
    sides = list(sides)
    return [sides[(r + i) % len(sides)] for r in range(rounds) for i in range(len(sides))]


def time_alternating(steps: dict[str, Callable[[], object]], rounds: int, clocks: dict[str, Callable[[], float]]
                     ) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """Seconds of every call of each step on every clock (``{clock: {side: [...]}}``), run in
    :func:`alternation_schedule`'s order, and each step's first loss (what it returned, read after the clocks)."""
    seconds = {name: {side: [] for side in steps} for name in clocks}
    first_loss: dict[str, float] = {}
    for side in alternation_schedule(steps, rounds):
        start = {name: clock() for name, clock in clocks.items()}
        loss = steps[side]()
        for name, clock in clocks.items():
            seconds[name][side].append(clock() - start[name])
        first_loss.setdefault(side, float(loss))
    return seconds, first_loss


def _round_fp16(backbone: ClipBackbone) -> None:
    """Round the CLIP's float tensors to float16 values in place: the official build_model casts to fp16 and back,
    so both sides then run the very same weights."""
    with torch.no_grad():
        for tensor in (*backbone.model.parameters(), *backbone.model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def _official_step(trainer, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    batch = {"img": images, "label": labels}

    def step() -> float:
        trainer.set_model_mode("train")
        return trainer.forward_backward(batch)["loss"]

    return step


def _our_steps(method_name: str, backbone: ClipBackbone, classnames: list[str], start: dict[str, torch.Tensor],
               images: torch.Tensor, labels: torch.Tensor, device: torch.device
               ) -> dict[str, Callable[[], object]]:
    """Ours in both scopes, each on its own copy of the learnable values (the official start), sharing the CLIP.

    Optimiser as the official config's (AdamW, weight decay 5e-4, the warm-up epoch's rate 1e-5), built by our
    trainer's builder for both scopes; fp32 as the official side here."""
    from torch.utils.data import TensorDataset

    from alignednorm.config import TrainConfig
    from alignednorm.engine.trainer import Trainer, build_optimizer, lr_at_epoch
    from alignednorm.methods import StepState, create_method

    config = TrainConfig(epochs=1, batch_size=len(images), precision="fp32", tensorboard=False)
    methods = []
    for _ in range(2):
        method = create_method(method_name, backbone).to(device)
        method.set_classnames(classnames)
        method.load_learnable_state_dict(start, source="the official start values")
        methods.append(method)
    bare, full = methods
    optimizer = build_optimizer(config, bare.learnable_parameters())
    for group in optimizer.param_groups:
        group["lr"] = lr_at_epoch(config, 0)
    trainer = Trainer(full, config, run_dir=None, progress=False)  # loads in this process (no workers)
    dataset = TensorDataset(images.cpu(), labels.cpu())

    def bare_step() -> torch.Tensor:
        bare.train()
        loss = bare.training_step((images, labels), StepState())["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def trainer_step() -> float:
        return trainer.fit(dataset, resume=False)["loss"]

    return {"ours-step": bare_step, "ours-trainer": trainer_step}


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has spent busy since boot (Linux ``/proc/stat``: user, nice,
    system, irq, softirq, steal), NaN where there is no such file. Less this process's CPU seconds, over the wall
    seconds of a step: how many cores others kept busy meanwhile, the load each step met."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cores(seconds: dict[str, dict[str, list[float]]], side: str) -> list[float]:
    """Per step of ``side``: the cores other processes kept busy while it ran (``machine`` less ``cpu`` seconds,
    over ``wall`` seconds); empty without the machine clock."""
    if "machine" not in seconds:
        return []
    return [max(m - c, 0.0) / w for m, c, w in zip(seconds["machine"][side], seconds["cpu"][side],
                                                  seconds["wall"][side], strict=True)]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_alternating_bench(official_repo: str | Path, dassl: str | Path | None = None, geometry: str = "vit-b16",
                          classes=(50,), batch: int = 8, iters: int = 3, device: str = "cpu",
                          weights_out: str | Path | None = None, method: str = "mmrlpp") -> dict:
    """The training step of the official MMRL++ and ours (both scopes) in turns in this process, per class count.

    Returns the seconds of every step per side on each clock (wall, process CPU and the machine's busy CPU
    seconds, :func:`machine_busy_seconds`; in the order run), each side's first loss (the same start values,
    images and labels: equal up to float rounding), the load average before and after, and the setting."""
    from alignednorm.compat.official import convert_official_state

    repo, dassl_root = check_official_repo(official_repo), check_dassl(dassl)
    dev = torch.device(device)
    clocks = {**{name: make_clock(dev, name) for name in CLOCKS}, "machine": machine_busy_seconds}
    backbone = random_clip(geometry)
    _round_fp16(backbone)
    official = import_official(repo, dassl_root)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_official_weights(backbone, Path(weights_out) if weights_out else Path(tmp) / "clip.pt")
        backbone = backbone.to(dev)
        cfg = official_config(official, repo, backbone.image_size)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=gen).to(dev)
        for n_classes in classes:
            labels = (torch.arange(batch) % n_classes).to(dev)
            classnames = [f"class {i}" for i in range(n_classes)]
            torch.manual_seed(0)
            trainer = build_official_trainer(official, cfg, classnames, weights, dev)
            start = convert_official_state({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                                           method)
            steps = {"official": _official_step(trainer, images, labels),
                     **_our_steps(method, backbone, classnames, start, images, labels, dev)}
            load_before = _load()
            with backbone.text_options(cut_text_padding=True, share_text_prefix=True):
                seconds, first_loss = time_alternating(steps, iters, clocks)
            runs.append({"classes": n_classes, "seconds": seconds, "first_loss": first_loss,
                         "load_before": load_before, "load_after": _load()})
            del trainer, steps
            gc.collect()
    return {"mode": "alternate", "method": method, "geometry": geometry, "batch": batch, "device": device,
            "clocks": [*CLOCKS, "machine"], "rounds": iters, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "order": list(SIDES), "scopes": dict(SCOPES), "runs": runs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "official": {"repo": str(repo), "dassl": str(dassl_root) if dassl_root else None,
                         "sha256": _fingerprint(repo)}}


def _ratio(official: list[float], ours: list[float]) -> str:
    """official ÷ ours: the ratio of the medians, in brackets the range of the per-round ratios."""
    per_round = sorted(a / b for a, b in zip(official, ours, strict=True))
    return f"{_median(official) / _median(ours):.2f}x ({per_round[0]:.2f}-{per_round[-1]:.2f})"


def _loads(values: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in values)


def format_alternating(report: dict) -> str:
    """Per class count and clock: the median seconds of each side, official ÷ ours in each scope, the trainer's
    cost over the bare step, the cores other processes kept busy during the steps and the load average; then
    every step as run and each side's first loss."""
    sides = [s for s in report["order"] if s in report["scopes"]]
    title = (f"official MMRL++ and ours ({report['method']}) alternating in one process on {report['geometry']} "
             f"({report['device']}, batch {report['batch']}, {report['threads']} threads, {report['cpus']} CPUs): "
             f"seconds per training step, median of {report['rounds']} rounds; round r starts with side r mod "
             f"{len(sides)}; wall and process CPU seconds of the same steps")
    header = (f"{'clock':<5} {'classes':>7} {'official':>9} {'ours-step':>10} {'ours-trainer':>13}"
              f" {'official/ours-step':>20} {'official/ours-trainer':>22} {'trainer-step':>13}"
              f" {'others-cores':>16}  load avg 1/5/15 min before -> after")
    lines = [title, *(f"  {side:<13} = {report['scopes'][side]}" for side in sides), header]
    details = []
    others = {run["classes"]: {side: others_cores(run["seconds"], side) for side in sides} for run in report["runs"]}
    for clock in (c for c in report["clocks"] if c in CLOCKS):
        for run in report["runs"]:
            sec = run["seconds"][clock]
            official, step, full = (_median(sec[side]) for side in SIDES)
            busy = sorted(x for per_side in others[run["classes"]].values() for x in per_side)
            busy_text = f"{_median(busy):.2f} ({busy[0]:.2f}-{busy[-1]:.2f})" if busy else "-"
            lines.append(f"{clock:<5} {run['classes']:>7} {official:>9.2f} {step:>10.2f} {full:>13.2f}"
                         f" {_ratio(sec['official'], sec['ours-step']):>20}"
                         f" {_ratio(sec['official'], sec['ours-trainer']):>22} {full - step:>+13.2f} {busy_text:>16}"
                         f"  {_loads(run['load_before'])} -> {_loads(run['load_after'])}")
            details.append(f"{run['classes']} classes, {clock} seconds of every step in the order run: " + "; ".join(
                f"{side} {', '.join(f'{x:.2f}' for x in sec[side])}" for side in sides))
    for run in report["runs"]:
        if any(others[run["classes"]].values()):
            details.append(f"{run['classes']} classes, cores other processes kept busy during each step: " + "; ".join(
                f"{side} {', '.join(f'{x:.2f}' for x in others[run['classes']][side])}" for side in sides))
        details.append(f"{run['classes']} classes, first loss (same start values, images, labels): " + ", ".join(
            f"{side} {run['first_loss'][side]:.6f}" for side in sides))
    note = ("(official/ours: ratio of the medians, in brackets the range of the per-round ratios; others-cores: "
            "cores other processes kept busy during the steps, median and range over all steps, from /proc/stat)")
    return "\n".join([*lines, note,
                      *details, f"peak RSS of this process: {report['peak_rss_mb']:.0f} MB (both sides)",
                      f"official code: {report['official']['repo']} (sha256 {report['official']['sha256']})"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: ``classes`` becomes a tuple of positive counts; a bad value raises
    :class:`ConfigError`."""
    parser = argparse.ArgumentParser(prog="python -m alignednorm.compat.bench_official",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", type=Path, help=f"a checkout of {OFFICIAL_URL}")
    parser.add_argument("--dassl", type=Path, help="a Dassl.pytorch checkout (default: the installed dassl)")
    parser.add_argument("--geometry", default="vit-b16", help=f"random CLIP: {', '.join(GEOMETRIES)}")
    parser.add_argument("--classes", default="50,500", help="comma-separated class counts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations (--alternate: rounds) per class count, the median is shown (default 2; "
                             "--alternate: 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--clock", default="wall", choices=CLOCKS,
                        help="wall, or cpu: process CPU seconds (--alternate records both on the same steps)")
    parser.add_argument("--alternate", action="store_true",
                        help="time the training step of the official code and ours (bare method step and full "
                             "trainer step) in turns in this process: the way to compare on a shared machine")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--weights-out", type=Path, help="keep the random CLIP's state dict at this path")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    try:
        args.classes = tuple(int(c) for c in args.classes.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--classes {args.classes!r}: expected comma-separated integers, e.g. 50,500") from None
    if args.iters is None:
        args.iters = 3 if args.alternate else 2
    if not args.classes or min(args.classes) < 1 or args.iters < 1 or args.batch < 1:
        raise ConfigError("--classes, --iters and --batch need positive values")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: expected a positive count")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.alternate:
            report = run_alternating_bench(args.official_repo, args.dassl, args.geometry, args.classes, args.batch,
                                           args.iters, args.device, args.weights_out)
        else:
            report = run_official_bench(args.official_repo, args.dassl, args.geometry, args.classes, args.batch,
                                        args.iters, args.device, args.clock, args.weights_out)
    except AlignedNormError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_alternating(report) if args.alternate else format_official(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
