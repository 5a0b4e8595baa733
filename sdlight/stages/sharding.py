"""Fully sharded data parallel (FSDP2, ``trainer=fsdp``) for the latent diffusion stage.

Lightning's ``ModelParallelStrategy`` starts one process per device and hands the module a device mesh; the stage
then shards its trainable parts with torch's ``fully_shard`` (`shard_trainable_parts`): each UNet block on its own,
then the UNet, and each training condition encoder. Frozen parts (the VAE, pretrained text towers) stay whole on
every rank. The strategy does not wrap the module in DDP, so a trainable parameter left unsharded would never be
averaged over the ranks: every one must end up sharded (checked). The EMA copy is sharded the same way, so that each
rank averages its own shard, with no communication.

`ShardedStrategy` is that strategy with checkpoints that hold ``module.state_dict()`` gathered whole: the same keys
(CompVis' names, which the modules' state-dict hooks give) and values as a one-process run's, so ``sdlight.sample``,
``export``, ``evaluate`` and ``model.init_from`` read them, and a run resumes across strategies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sdlight.conditioning.base import ConditionEncoder
from sdlight.errors import UsageError

_BLOCKS = ("input_blocks", "middle_block", "output_blocks")  # the UNet's
_TRANSFORMER_BLOCKS = ("joint_blocks", "blocks")  # MMDiT's, DiT's


def backbone_blocks(module: nn.Module) -> list[nn.Module] | None:
    """A backbone's blocks (the UNet's input, middle and output blocks; a transformer's ``joint_blocks`` (MMDiT)
    or ``blocks`` (DiT)), or None for a module that is not a backbone (backbones say their ``size_multiple``)."""
    if all(hasattr(module, name) for name in _BLOCKS):
        return [*module.input_blocks, module.middle_block, *module.output_blocks]
    if getattr(module, "size_multiple", None) is None:
        return None
    for name in _TRANSFORMER_BLOCKS:
        blocks = getattr(module, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    return None


def sharding_units(part: nn.Module) -> list[nn.Module]:
    """The modules of ``part`` sharded each on its own, inner ones first: every block of the backbone, then the
    backbone (its embeddings and output layers); every condition encoder. One unit's parameters are gathered for
    its forward and freed after it, so the largest unit bounds the memory that a rank needs beyond its shards."""
    units: list[nn.Module] = []
    for module in part.modules():
        blocks = backbone_blocks(module)
        if blocks is not None:
            units += [*blocks, module]
        elif isinstance(module, ConditionEncoder):
            units.append(module)
    return units


def shard_trainable_parts(stage: nn.Module, parts: nn.Module, ema_parts: nn.Module | None, mesh: Any) -> None:
    """Shards the trainable ``parts`` over the data-parallel ``mesh`` (`sharding_units`), and their EMA copy
    ``ema_parts`` the same way: the same parameters split in the same places, so the EMA update is local. Raises when
    a parameter of ``stage`` that trains is left whole."""
    from torch.distributed.fsdp import fully_shard

    for group in [parts] + ([ema_parts] if ema_parts is not None else []):
        for unit in sharding_units(group):
            fully_shard(unit, mesh=mesh)
    whole = [name for name, p in stage.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if whole:
        raise UsageError(f"trainer=fsdp: {len(whole)} trainable parameters are in no sharded block and would not be "
                         f"averaged over the processes (e.g. {whole[0]}); train them with trainer=ddp")


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel dimension of a ModelParallelStrategy's mesh; the stages shard over it only."""
    if mesh["tensor_parallel"].size() != 1:
        raise UsageError(f"trainer.strategy.tensor_parallel_size={mesh['tensor_parallel'].size()}: the diffusion "
                         "stage shards over data-parallel processes only; set it to 1")
    return mesh["data_parallel"]


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def local(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Each tensor's own part on this rank (a sharded one's shard, which shares its storage; others as they are)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def reshard(modules: Iterable[nn.Module]) -> None:
    """Puts sharded modules back to their shards. After a forward without backward (validation, sampling) the
    outermost sharded module keeps its gathered weights for the next forward; weights written into the shards
    (the EMA's, swapped in and out) would then not be seen."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def gathered_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every sharded tensor gathered whole, on the CPU, on rank 0; empty on the other
    ranks, which take part in the gathers."""
    reshard([module])
    rank0 = dist.get_rank() == 0
    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()  # a collective: every rank, in the same order
        if rank0:
            out[key] = value.detach().cpu() if isinstance(value, Tensor) else value
    return out


def load_whole_state_dict(module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """Loads a whole state dict (``module.state_dict()``'s names, as `gathered_state_dict` writes it) into a module
    whose parameters may be sharded: each rank keeps its own shard of every tensor."""
    reshard([module])
    state = dict(state_dict)
    for key, target in module.state_dict().items():
        if isinstance(target, DTensor) and key in state:
            # every rank holds the whole tensor (the file is mapped): each takes its shard, no communication
            state[key] = distribute_tensor(state[key].to(target.dtype), target.device_mesh, target.placements,
                                           src_data_rank=None)
    return module.load_state_dict(state, strict=strict)


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, with the module's ``configure_model`` sharding it) for pure
    data-parallel sharding: ``data_parallel_size="all"`` is every process (``tensor_parallel_size=1``).

    Its one-file checkpoints (``save_distributed_checkpoint=False``, the default here) hold ``module.state_dict()``
    gathered whole, under the names the module's state-dict hooks give, as a one-process checkpoint does.
    (Lightning's own gather, torch's ``get_model_state_dict``, maps each key of ``state_dict()`` back to an attribute
    path and fails on the keys those hooks rename: "'Conditioner' object has no attribute 'positional_embedding'".
    Sharded checkpoint folders, ``save_distributed_checkpoint=True``, go through it too and are refused.) The optimizer states are gathered whole too, keyed by each parameter's
    position in the optimizer, as ``Optimizer.state_dict`` keys them (Lightning's by position in the module).
    """

    def __init__(self, data_parallel_size: int | str = "all", tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        if save_distributed_checkpoint:
            raise UsageError("trainer.strategy.save_distributed_checkpoint=true is not supported by "
                             f"{type(self).__name__}: checkpoints are one file, which every entry point reads")
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "all":
            if not isinstance(self._tensor_parallel_size, int):
                raise UsageError("trainer.strategy.data_parallel_size=all needs an integer tensor_parallel_size")
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden("configure_model", self.lightning_module):  # Lightning's own check: a traceback
            raise UsageError(f"trainer=fsdp: {type(self.lightning_module).__name__} has no sharding (the latent "
                             "diffusion stage has); train it with trainer=ddp")
        super().setup(trainer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return gathered_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)  # by name; on rank 0 only
        if self.global_rank != 0:
            return state
        return FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model,
                                                               optim=optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        self.restore_weights(checkpoint)
        del checkpoint["state_dict"]  # Lightning would load it again, into the sharded module
        return checkpoint

    def restore_weights(self, checkpoint: Mapping[str, Any]) -> None:
        """A whole checkpoint's weights (EMA included) and optimizer states into the sharded module and optimizers,
        each rank taking its shards: at resume, and when a loss spike rolls the run back (callbacks/rollback.py)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        strict = self.lightning_module.strict_loading
        load_whole_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            # saved keyed by position: torch's loader takes them by parameter name
            state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model,
                                                                    optim=optimizer)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
