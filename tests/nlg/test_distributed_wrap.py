"""e2e_nlg.distributed.wrap_ddp: parameters synced, buffers not re-sent each forward, on torch releases with and
without DDP's ``forward_sync_buffers`` argument (2.13 renamed ``broadcast_buffers``)."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "NLG"))
from e2e_nlg import distributed  # noqa: E402


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + os.path.join(tmp_path, "store"))
    yield
    dist.destroy_process_group()


def _model():
    m = torch.nn.Linear(3, 2)
    m.register_buffer("mask", torch.ones(2))
    return m


def test_wrap_ddp_never_syncs_buffers_in_forward(group):
    ddp = distributed.wrap_ddp(_model(), torch.device("cpu"))
    assert ddp.require_forward_param_sync and not ddp.will_sync_module_buffers()
    ddp(torch.randn(4, 3)).sum().backward()
    assert ddp.module.weight.grad is not None


def test_wrap_ddp_on_a_torch_without_forward_sync_buffers(group, monkeypatch):
    """Older torch: only ``broadcast_buffers`` exists; it is what wrap_ddp then passes."""
    seen = {}

    class OldDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            super().__init__()
            seen.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers)
            self.module = module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", OldDDP)
    distributed.wrap_ddp(_model(), torch.device("cpu"))
    assert seen == {"device_ids": None, "broadcast_buffers": False}
