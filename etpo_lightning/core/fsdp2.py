"""FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``.

``TokenRLModule.configure_model`` shards every network it holds (policy, critic, target
critic, reference): each decoder layer is a unit of its own, and the network's root holds the
rest (embeddings, final norm, output head, a critic's value head); under LoRA the one peft
model the adapter views share is sharded once (``SharedLoRA.shard``). Parameters become
``DTensor``s sharded along dim 0 over the data-parallel ranks; gradients come back sharded
the same way (reduce-scatter, averaged over ranks), so the optimizers, gradient clipping and
the Polyak update all work on local shards.

Networks are built on the meta device on every rank; rank 0 alone reads the checkpoint, once,
and its full tensors are broadcast shard by shard (``load_full_states``).

The same code runs on CPU (gloo) and GPUs (NCCL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import Tensor, nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {name!r}")
    return _DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for data-parallel FSDP2: shards over all ranks
    (``data_parallel_size`` = world size, no tensor parallelism) unless told otherwise, with an
    optional ``MixedPrecisionPolicy``.

    Args:
        param_dtype: dtype the parameters are all-gathered and computed in (e.g. ``bfloat16``);
            the sharded parameters, gradients and optimizer states keep theirs (fp32 master
            weights). None: no casting.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32`` for exact sums of bf16
            gradients); None: ``param_dtype``.
        reshard_after_forward: Free the gathered parameters after each unit's forward (less
            memory, one more all-gather in backward).
        **kwargs: ``ModelParallelStrategy``'s (``save_distributed_checkpoint``, ``timeout``, ...).
    """

    def __init__(self, param_dtype: str | None = None, reduce_dtype: str | None = None,
                 reshard_after_forward: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.param_dtype = _dtype(param_dtype)
        self.reduce_dtype = _dtype(reduce_dtype)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the number of nodes (tensor parallelism
        # within a node); here every rank is a data-parallel replica.
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def mixed_precision_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


def is_fsdp2_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 applied in
    ``configure_model``)."""
    return isinstance(strategy, ModelParallelStrategy)


def shard_mesh(strategy: ModelParallelStrategy) -> Any:
    """The 1-D mesh the networks are sharded over: the strategy's data-parallel dimension when
    it spans every rank, else (Lightning's default split, all ranks "tensor parallel") a mesh
    over the whole world: these modules apply no tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = strategy.device_mesh
    dp = mesh["data_parallel"]
    if dp.size() == dist.get_world_size():
        return dp
    return init_device_mesh(strategy.root_device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def decoder_layers(net: nn.Module) -> list[nn.Module]:
    """The blocks Hugging Face never splits across devices (``_no_split_modules``: the decoder
    layers), each of which becomes its own FSDP unit."""
    names: set[str] = set()
    for m in net.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    # The MRO: fully_shard swaps a unit's class for an FSDP subclass of it.
    return [m for m in net.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]


def shard_settings(strategy: Any) -> dict[str, Any]:
    """``fully_shard_network``'s settings from the strategy: its mesh (``shard_mesh``), its
    ``MixedPrecisionPolicy`` if it has one, and whether units reshard after their forward."""
    return {"mesh": shard_mesh(strategy),
            "mp_policy": strategy.mixed_precision_policy() if hasattr(strategy, "mixed_precision_policy") else None,
            "reshard_after_forward": getattr(strategy, "reshard_after_forward", True)}


def fully_shard_network(net: nn.Module, mesh: Any, mp_policy: Any = None, reshard_after_forward: bool = True,
                        inner_units: Sequence[nn.Module] = ()) -> None:
    """``fully_shard`` every decoder layer of ``net``, then each of ``inner_units``, then ``net``
    itself (the rest)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    for unit in [*decoder_layers(net), *inner_units]:
        fully_shard(unit, **kwargs)
    fully_shard(net, **kwargs)


def load_full_states(networks: dict[str, nn.Module], full: dict[str, dict[str, Tensor]] | None,
                     device: torch.device) -> None:
    """Give sharded ``networks`` their weights from rank 0's full state dicts (``full``; None
    on the other ranks): networks still on the meta device are materialised, every parameter
    is broadcast from rank 0 and each rank keeps its shard. Buffers (not sharded; some, like
    the rotary frequencies, in no state dict) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for name, net in networks.items():
        if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
            net.to_empty(device=device)
        set_model_state_dict(net, full[name] if full is not None else {}, options=options)
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (a ``DTensor``), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole of ``t``, gathered from every rank if it is a ``DTensor`` (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """``net``'s state dict with every ``DTensor`` gathered, on the CPU, on every rank (a
    collective: all ranks call it). Memory: one full copy per rank."""
    return {k: full_tensor(v).detach().cpu() for k, v in net.state_dict().items()}


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s full parameters on every rank for the duration: one all-gather per unit
    on entry, none per forward (``generate`` calls the policy once per token); resharded on
    exit. A no-op if ``model`` is not sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    saved = [m._get_fsdp_state()._fsdp_param_group for m in units]
    flags = [g.post_forward_mesh_info is not None if g is not None else None for g in saved]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, flag in zip(units, flags):
            if flag is not None:
                m.set_reshard_after_forward(flag, recurse=False)
            m.reshard()
