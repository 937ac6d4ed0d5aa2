"""Two processes (gloo, CPU) train to the same prompt as one process with the same global batch."""

import contextlib
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.engine.distributed import ShardedBatches
from alignednorm.engine.trainer import TrainConfig, Trainer
from alignednorm.methods import create_method

CONFIG = TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, lr=1e-2)


@contextlib.contextmanager
def _globals_kept(threads: int | None = 1):
    """Run with ``threads`` threads (None: as they are), then give back the caller's thread count
    and every seeded RNG's state.

    Trainer.fit seeds torch, numpy and Python's random; tests after this one must not see that.
    """
    before, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(before)
            random.setstate(py_state)
            np.random.set_state(np_state)


@pytest.fixture(autouse=True)
def _globals_restored():
    """Whatever a test here changes (threads, RNGs, environment, cwd), the next test finds as before."""
    env, cwd = dict(os.environ), os.getcwd()
    with _globals_kept(threads=None):
        yield
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _train() -> dict:
    with _globals_kept():
        backbone = ClipBackbone(make_tiny_clip(seed=2, layers=3))
        torch.manual_seed(0)
        method = create_method("mmrlpp", backbone, {"rep_layers": [2, 3], "rep_dim": 16, "n_rep_tokens": 2})
        method.set_classnames(["a", "b", "c"])
        gen = torch.Generator().manual_seed(5)
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=gen), torch.arange(8) % 3)
        trainer = Trainer(method, CONFIG, progress=False)
        # SGD: the step is proportional to the averaged gradient (Adam's first step is ~sign(g), too sensitive).
        trainer.optimizer = torch.optim.SGD(method.learnable_parameters(), lr=CONFIG.lr)
        trainer.fit(data)
        return method.learnable_state_dict()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state = _train()
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    single = _train()
    assert ddp.keys() == single.keys()
    for key in single:
        assert torch.allclose(ddp[key], single[key], atol=1e-6), key
    assert any(not torch.allclose(single[k], v) for k, v in _untrained().items())


def _untrained() -> dict:
    with _globals_kept():
        backbone = ClipBackbone(make_tiny_clip(seed=2, layers=3))
        torch.manual_seed(0)
        method = create_method("mmrlpp", backbone, {"rep_layers": [2, 3], "rep_dim": 16, "n_rep_tokens": 2})
        return method.learnable_state_dict()


def test_helpers_leave_globals_as_found():
    torch.set_num_threads(2)
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    _train()
    _untrained()
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.random.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()


def test_sharded_batches_split_each_global_batch():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(ShardedBatches(batches, 2, 0)) == [[0, 1], [4, 5]]
    assert list(ShardedBatches(batches, 2, 1)) == [[2, 3], [6, 7]]


def test_batch_must_divide_across_processes(monkeypatch):
    from alignednorm.engine import distributed
    from alignednorm.errors import ConfigError

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    backbone = ClipBackbone(make_tiny_clip(seed=2, layers=3))
    method = create_method("mmrlpp", backbone, {"rep_layers": [2, 3], "rep_dim": 16})
    with pytest.raises(ConfigError, match="batch_size = 4 must be divisible by the 3 processes"):
        Trainer(method, CONFIG)
