"""Two processes (gloo, CPU) train to the same prompt as one process with the same global batch."""

import socket

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


def _train() -> dict:
    torch.set_num_threads(1)
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
    backbone = ClipBackbone(make_tiny_clip(seed=2, layers=3))
    torch.manual_seed(0)
    return create_method("mmrlpp", backbone, {"rep_layers": [2, 3], "rep_dim": 16, "n_rep_tokens": 2}).learnable_state_dict()


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
