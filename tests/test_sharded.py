"""Issue 20, several processes: saliency and masked training of the whole erasure in two CPU processes (torchrun, the
launcher ``accelerate launch`` uses; gloo) on the tiny FLUX transformer and the tiny U-Net, against one process.

Sharding (FSDP) cannot be tested on CPU through accelerate: accelerate 1.16 turns its FSDP plugin (FSDP1 FULL_SHARD
with ``use_orig_params``, or FSDP2) into FSDP only for accelerator devices; with CPU processes it makes a multi-CPU
run and ``prepare`` wraps the model in ``DistributedDataParallel``. The probe test pins that (it fails once accelerate
shards on CPU, the signal to test FSDP here); the two-process erasure test is the closest run that does run: the
same saliency all-reduce and the same masked update on gradients reduced across processes. An FSDP run (state forced
on CPU) is refused in one line before any image is drawn."""

import json
import os
import subprocess
import sys

import pytest
import torch

from salun_diffusers import load_mask
from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.erasure import training
from salun_diffusers.families import denoiser, load_base_pipeline
from salun_diffusers.loaders import load_erasure
from salun_diffusers.testing import save_dummy_pipeline, save_flow_pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "scripts", "dist_erase.py")
LR, STEPS = 1e-2, 3


def _torchrun(port: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600)


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("family,port", [("flux", "29541"), ("unet", "29543")])
def test_two_process_erasure_equals_one_process(family, port, tmp_path, monkeypatch):
    """Two processes, batch 2 each, against one process with batch 2 and 2 accumulated micro-batches that draw
    exactly what each process draws (micro-batch m = process m): the same saliency mask, the same trained weights up
    to float summation order, every weight outside the mask bit-identical to the base, and the erasure written by
    process 0 loads with load_erasure."""
    if family == "flux":
        base_dir = save_flow_pipeline(str(tmp_path / "base"), "flux", guidance_embeds=True)
    else:
        base_dir = save_dummy_pipeline(str(tmp_path / "base"))
    kw = dict(pretrained_model_name_or_path=base_dir, concept="nudity", cache_dir=str(tmp_path / "cache"),
              num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=STEPS,
              train_batch_size=2, learning_rate=LR, adam_weight_decay=0.1, mask_ratio=0.3, resolution=16, seed=0,
              save_pipeline="none")
    # one process: micro-batch m draws with the generators of process m (the real run's micro 0 of each process)
    draw = training._step_generators
    monkeypatch.setattr(training, "_step_generators",
                        lambda seed, step, micro, rank, device: draw(seed, step, 0, micro, device))
    one = erase(EraseConfig(output_dir=str(tmp_path / "one"), gradient_accumulation_steps=2, **kw))
    monkeypatch.undo()

    config = tmp_path / "two.json"
    config.write_text(json.dumps(dict(kw, output_dir=str(tmp_path / "two"))))
    proc = _torchrun(port, "erase", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]

    mask_one, _ = load_mask(one.mask_path)
    mask_two, _ = load_mask(str(tmp_path / "two" / "mask.safetensors"))
    assert all(torch.equal(mask_one[n], mask_two[n]) for n in mask_one)  # the saliency all-reduce: the same top-k

    pipe = load_base_pipeline(base_dir)
    base = _params(denoiser(pipe))
    load_erasure(pipe, str(tmp_path / "two"))
    two = _params(denoiser(pipe))
    trained = _params(one.unet)
    moved = 0
    for name, m in mask_one.items():
        assert torch.equal(two[name][~m], base[name][~m]), name  # outside the mask: bit-identical to the base
        moved += int((two[name][m] != base[name][m]).sum())
        # AdamW moves an entry by at most lr (1 + weight_decay |w|) per step, so the two runs' gradients, equal up
        # to summation order, can put it at most LR * STEPS apart where Adam's m / sqrt(v) flips sign on a
        # near-zero gradient; elsewhere they agree to float rounding. Both bounds are checked.
        diff = (two[name] - trained[name]).abs()
        assert float(diff.max()) <= LR * STEPS * (1 + 0.1 * float(base[name].abs().max())), name
        assert int((diff > 1e-4 * LR).sum()) <= max(1, int(1e-3 * m.sum())), name
    assert moved > 0.5 * sum(int(m.sum()) for m in mask_one.values())


def test_accelerate_fsdp_plugin_is_not_sharding_on_cpu(tmp_path):
    """accelerate's FSDP plugin (FSDP1 FULL_SHARD with use_orig_params, and FSDP2) on two CPU processes gives a
    multi-CPU run with the module wrapped in DistributedDataParallel: no sharding to test on CPU (docs/flow-models.md,
    "When one GPU is not enough"). Fails once accelerate shards on CPU: then test the FSDP run here."""
    out = tmp_path / "probe.json"
    proc = _torchrun("29545", "fsdp-probe", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    for version in ("fsdp1", "fsdp2"):
        assert found[version] == {"distributed_type": "DistributedType.MULTI_CPU", "num_processes": 2,
                                  "wrapped": "DistributedDataParallel"}, found


def test_an_fsdp_run_is_refused_in_one_line_before_any_image_is_drawn(tmp_path):
    """Where accelerate does shard (GPUs), the erasure refuses FSDP before drawing anything (the masked update needs
    whole weights); on CPU the script forces accelerate's state to FSDP to reach that check. Without the refusal,
    accelerate's prepare fails after data and saliency with "KeyError: A parameter in the optimizer couldn't be
    switched to its sharded version" (FSDP2) or "Inconsistent compute device and `device_id`" (FSDP1 on CPU)."""
    base_dir = save_flow_pipeline(str(tmp_path / "base"), "flux")
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps(dict(pretrained_model_name_or_path=base_dir, concept="nudity",
                                      cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"),
                                      num_forget_images=4, num_retain_images=4, resolution=16)))
    proc = _torchrun("29547", "fsdp-forced", str(config), "2")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "Error:" in line and "[rank0]" in line]
    assert errors and errors[-1].startswith("[rank0]: ValueError: FSDP is not supported yet:"), proc.stderr[-3000:]
    assert not any(f.endswith(".png") for _, _, files in os.walk(tmp_path / "cache") for f in files)
