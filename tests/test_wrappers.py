"""Wrappers (torch.compile, DDP) are looked through the same way by the network bookkeeping
and by the choice of calling a model with ``logits_to_keep``."""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from etpo_lightning.core.models import accepts_logits_to_keep
from etpo_lightning.core.networks import unwrap_module, wrapper_layers


class SaysItSlices(nn.Linear):
    accepts_logits_to_keep = True


class TakesKwargs(nn.Linear):
    def forward(self, x, **kwargs):  # a **kwargs forward may ignore logits_to_keep
        return super().forward(x)


class NamesIt(nn.Linear):
    def forward(self, x, logits_to_keep: int = 0):
        return super().forward(x)


def test_compile_and_ddp_are_unwrapped_to_the_same_module(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for cls, slices in ((SaysItSlices, True), (TakesKwargs, False), (NamesIt, True)):
            inner = cls(3, 2)
            wrapped = DistributedDataParallel(torch.compile(inner))
            layers = list(wrapper_layers(wrapped))
            assert [type(m).__name__ for m in layers] == ["DistributedDataParallel", "OptimizedModule", cls.__name__]
            assert unwrap_module(wrapped) is inner and unwrap_module(inner) is inner
            assert accepts_logits_to_keep(wrapped) is slices and accepts_logits_to_keep(inner) is slices
    finally:
        dist.destroy_process_group()


def test_a_module_attribute_is_not_mistaken_for_a_wrapper():
    holder = nn.Module()
    holder.module = SaysItSlices(3, 2)  # an ordinary submodule named "module", not a wrapper
    assert unwrap_module(holder) is holder
    assert accepts_logits_to_keep(holder) is False
