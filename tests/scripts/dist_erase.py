"""Multi-process erasure on a tiny pipeline, for tests/test_sharded.py (run with ``torch.distributed.run``).

``dist_erase.py erase CONFIG_JSON``: ``erase(EraseConfig(**json))`` in every process (start it with
``ACCELERATE_USE_CPU=true`` so accelerate makes a multi-CPU, gloo run of it: saliency batches split over the processes
and all-reduced, training under DDP, the outputs written by process 0).

``dist_erase.py fsdp-probe OUT_JSON``: what accelerate makes of its FSDP plugin (FULL_SHARD, ``use_orig_params``; and
FSDP2) on CPU processes: the distributed type and the class ``prepare`` wraps a module in, written by process 0.

``dist_erase.py fsdp-forced CONFIG_JSON 1|2`` (a diagnostic, not a test): the erasure with accelerate's state forced
to FSDP on CPU, to see where the erasure itself stops (docs/flow-models.md, "When one GPU is not enough")."""

import json
import sys

import torch


def erase_run(config_json: str) -> None:
    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erase import erase

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


def fsdp_forced(config_json: str, version: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erase import erase

    kw = dict(reshard_after_forward=True) if version == "2" else dict(reshard_after_forward="FULL_SHARD",
                                                                       use_orig_params=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=int(version), **kw)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    for state in (AcceleratorState._shared_state, PartialState._shared_state):  # what accelerate refuses on CPU
        state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    with open(config_json) as f:
        erase(EraseConfig(**json.load(f)), accelerator=accelerator)


if __name__ == "__main__":
    {"erase": erase_run, "fsdp-probe": fsdp_probe, "fsdp-forced": fsdp_forced}[sys.argv[1]](*sys.argv[2:])
