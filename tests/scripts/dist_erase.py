"""Multi-process erasure on a tiny pipeline, for tests/test_sharded.py (run with ``torch.distributed.run``).

``dist_erase.py erase CONFIG_JSON [RECORD_PREFIX]``: ``erase(EraseConfig(**json))`` in every process (start it with
``ACCELERATE_USE_CPU=true`` so accelerate makes a multi-CPU, gloo run of it: saliency batches split over the processes
and all-reduced, training under DDP, or sharded with ``"shard_weights": true``, the outputs written by process 0).
With RECORD_PREFIX each process writes ``RECORD_PREFIX.<rank>.json``: what its masked update trains (the largest
weight's global and local sizes, its masked entries in all and on this process, the flat values it holds), and
``RECORD_PREFIX.saliency.<rank>.pt``: the saliency the mask was selected from (its shard of each weight's, when
sharded; the last one, if several were).

``dist_erase.py fsdp-probe OUT_JSON``: what accelerate makes of its FSDP plugin (FULL_SHARD, ``use_orig_params``; and
FSDP2) on CPU processes: the distributed type and the class ``prepare`` wraps a module in, written by process 0.

``dist_erase.py fsdp-forced CONFIG_JSON 1|2 [RECORD_PREFIX]``: the erasure with accelerate's state forced to FSDP on
CPU (what an FSDP accelerate config gives on GPUs), which must take the sharded path (docs/flow-models.md, "When one
GPU is not enough").

``dist_erase.py checkpoint-faults OUT_DIR RECORD_PREFIX``: sharded checkpoint writes and loads that fail in one
process only (:func:`checkpoint_faults`).

``dist_erase.py cli NAN_RANK ARGS...``: ``train_erase.main(ARGS)``, the process's exit code its; with NAN_RANK a process
index (``-``: none), that process's training loss at step 2 is NaN, the other's finite (a divergence one process
sees). Start it without torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), so that each
process ends by itself, and a hang shows, rather than torchrun ending the others when one fails."""

import json
import math
import sys

import torch


def record_shards(prefix: str) -> None:
    """Make every MaskedUpdate of this process write what it trains to ``prefix.<rank>.json``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from salun_diffusers.erasure import saliency, training
    from salun_diffusers.masking import selected_counts

    class Recording(training.MaskedUpdate):
        def __init__(self, model, mask, hooks=True):
            super().__init__(model, mask, hooks)
            name = max(self.params, key=lambda n: self.params[n].numel())
            p = self.params[name]
            local = p.to_local() if isinstance(p, DTensor) else p
            counts = selected_counts(mask)  # a sharded mask's: over all processes
            found = {"sharded": isinstance(p, DTensor), "name": name, "numel": p.numel(),
                     "local_numel": local.numel(), "local_shape": list(local.shape),
                     "mask_sharded": isinstance(mask[name], DTensor),
                     "masked": counts[name], "local_masked": self.values[name].numel(),
                     "values": sum(v.numel() for v in self.values.values()),
                     "mask_total": sum(counts.values())}
            with open(f"{prefix}.{dist.get_rank()}.json", "w") as f:
                json.dump(found, f)

    training.MaskedUpdate = Recording

    select = saliency.mask_from_saliency

    def recording(values, *args, **kw):  # the saliency the mask is selected from: this process's shards when sharded
        torch.save({n: s.to_local() if isinstance(s, DTensor) else s for n, s in values.items()},
                   f"{prefix}.saliency.{dist.get_rank()}.pt")
        return select(values, *args, **kw)

    saliency.mask_from_saliency = recording


def erase_run(config_json: str, record: str = None) -> None:
    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erase import erase

    if record:
        record_shards(record)
    with open(config_json) as f:
        erase(EraseConfig(**json.load(f)))


def fsdp_probe(out_json: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    found = {}
    for version in (1, 2):
        kw = dict(reshard_after_forward=True) if version == 2 else dict(reshard_after_forward="FULL_SHARD",
                                                                         use_orig_params=True)
        accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=version, **kw))
        model = accelerator.prepare(torch.nn.Linear(4, 4))
        found[f"fsdp{version}"] = {"distributed_type": str(accelerator.distributed_type),
                                   "num_processes": accelerator.num_processes, "wrapped": type(model).__name__}
        AcceleratorState._reset_state(reset_partial_state=False)
    if accelerator.is_main_process:
        with open(out_json, "w") as f:
            json.dump(found, f)
    accelerator.wait_for_everyone()


def fsdp_forced(config_json: str, version: str, record: str = None) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erase import erase

    kw = dict(reshard_after_forward=True) if version == "2" else dict(reshard_after_forward="FULL_SHARD",
                                                                       use_orig_params=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=int(version), **kw)
    with open(config_json) as f:
        config = EraseConfig(**json.load(f))
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    for state in (AcceleratorState._shared_state, PartialState._shared_state):  # what accelerate refuses on CPU
        state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if record:
        record_shards(record)
    erase(config, accelerator=accelerator)


def cli(nan_rank: str, *argv) -> None:
    import torch.distributed as dist

    import train_erase
    from salun_diffusers.erasure import training

    if nan_rank != "-":
        loss_of, calls = training.salun_loss, []

        def salun_loss(*args, **kw):
            loss, forget, retain = loss_of(*args, **kw)
            calls.append(1)
            return (loss * math.nan if len(calls) == 2 and dist.get_rank() == int(nan_rank) else loss), forget, retain

        training.salun_loss = salun_loss
    sys.exit(train_erase.main(list(argv)))


def checkpoint_faults(out_dir: str, record: str) -> None:
    """A sharded checkpoint written after step 2, then one after step 4 whose write fails in process 1 only, then
    checkpoint-2 resumed with a restore that fails in process 1 only: each process writes what each call raised in it
    to ``record.<rank>.json`` (a process left waiting in a collective would hang here)."""
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erasure.checkpoints import load_sharded_checkpoint, save_sharded_checkpoint

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    config = EraseConfig(output_dir=out_dir, checkpoints_total_limit=1)
    os.makedirs(out_dir, exist_ok=True)
    save_sharded_checkpoint(accelerator, config, 2, {"values": torch.full((3,), float(rank))})
    found = {}
    try:  # a lambda cannot be pickled: process 1's write fails half-way
        save_sharded_checkpoint(accelerator, config, 4, {"values": (lambda: 0) if rank == 1 else torch.zeros(3)})
    except Exception as exc:  # noqa: BLE001
        found["save"] = f"{type(exc).__name__}: {exc}"

    def restore(state):
        if rank == 1:
            raise ValueError("the saved masked values are not this mask's")
        found["restored"] = state["values"].tolist()

    try:
        load_sharded_checkpoint(accelerator, os.path.join(out_dir, "checkpoint-2"), restore)
    except Exception as exc:  # noqa: BLE001
        found["load"] = f"{type(exc).__name__}: {exc}"
    with open(f"{record}.{rank}.json", "w") as f:
        json.dump(found, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    from salun_diffusers.cli_args import leave_process_group

    try:
        {"erase": erase_run, "fsdp-probe": fsdp_probe, "fsdp-forced": fsdp_forced, "cli": cli,
         "checkpoint-faults": checkpoint_faults}[sys.argv[1]](*sys.argv[2:])
    finally:  # a gloo process exiting with its group open aborts now and then (SIGABRT)
        leave_process_group()
