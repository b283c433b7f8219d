"""Issue 20, several processes: saliency and masked training of the whole erasure in two CPU processes (torchrun, the
launcher ``accelerate launch`` uses; gloo) on the tiny FLUX transformer and the tiny U-Net, against one process: each
process with the whole model (DDP), and sharded (``--shard_weights``: FSDP2 ``fully_shard``, each process computing
the saliency of its own shard of every weight, the global top-k over the shards, and training the masked entries of
its shard).

accelerate 1.16 turns its FSDP plugin into FSDP only for accelerator devices; with CPU processes it makes a multi-CPU
run and ``prepare`` wraps the model in ``DistributedDataParallel`` (the probe test pins that). So on CPU the sharded
path is asked for with ``--shard_weights``; a run with accelerate's state forced to FSDP (what an FSDP config gives
on GPUs) must take the same path, and does."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

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


def _base(family: str, folder: str) -> str:
    if family == "flux":
        return save_flow_pipeline(folder, "flux", guidance_embeds=True)
    return save_dummy_pipeline(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """family -> (base folder, run settings, the one-process run): batch 2 and 2 accumulated micro-batches, micro-batch
    m drawn with the generators of process m (what process m draws as its micro-batch 0 in a two-process run)."""
    runs = {}

    def get(family):
        if family not in runs:
            tmp = tmp_path_factory.mktemp(f"one-{family}")
            base_dir = _base(family, str(tmp / "base"))
            kw = dict(pretrained_model_name_or_path=base_dir, concept="nudity", cache_dir=str(tmp / "cache"),
                      num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=STEPS,
                      train_batch_size=2, learning_rate=LR, adam_weight_decay=0.1, mask_ratio=0.3, resolution=16,
                      seed=0, save_pipeline="none")
            draw = training._step_generators
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(training, "_step_generators",
                           lambda seed, step, micro, rank, device: draw(seed, step, 0, micro, device))
                one = erase(EraseConfig(output_dir=str(tmp / "one"), gradient_accumulation_steps=2, **kw))
            runs[family] = base_dir, kw, one
        return runs[family]

    return get


def _check_shards(prefix: str, computed: bool = True) -> None:
    """Each process trained its own shard: the largest weight's local shard is smaller than the weight, the shards
    and their masked entries add up to the weight's, and each process holds the flat values of its masked entries only."""
    found = [json.loads(open(f"{prefix}.{rank}.json").read()) for rank in (0, 1)]
    assert all(f["sharded"] and f["local_numel"] < f["numel"] for f in found), found
    # the sharded saliency pass's mask: each process its part; a loaded (--mask_path) one: whole, sliced by each
    assert all(f["mask_sharded"] == computed for f in found), found
    assert sum(f["local_numel"] for f in found) == found[0]["numel"], found
    assert sum(f["local_masked"] for f in found) == found[0]["masked"], found
    assert sum(f["values"] for f in found) == found[0]["mask_total"], found
    assert all(0 < f["values"] < f["mask_total"] for f in found), found


@pytest.mark.parametrize("mode", ["ddp", "sharded"])
@pytest.mark.parametrize("family,port", [("flux", "29541"), ("unet", "29543")])
def test_two_process_erasure_equals_one_process(family, port, mode, tmp_path, reference):
    """Two processes, batch 2 each (each with the whole model, or ``--shard_weights``), against one process with
    batch 2 and 2 accumulated micro-batches that draw exactly what each process draws: the same saliency mask, the
    same trained weights up to float summation order, every weight outside the mask bit-identical to the base, and
    the erasure written by process 0 loads with load_erasure; sharded, each process trained only its shard."""
    base_dir, kw, one = reference(family)
    config = tmp_path / "two.json"
    config.write_text(json.dumps(dict(kw, output_dir=str(tmp_path / "two"), shard_weights=mode == "sharded")))
    port = str(int(port) + 10 * (mode == "sharded"))
    proc = _torchrun(port, "erase", str(config), str(tmp_path / "shards"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mode == "sharded":
        _check_shards(str(tmp_path / "shards"))
    else:
        assert not json.loads((tmp_path / "shards.0.json").read_text())["sharded"]

    mask_one, _ = load_mask(one.mask_path)
    mask_two, _ = load_mask(str(tmp_path / "two" / "mask.safetensors"))
    assert all(torch.equal(mask_one[n], mask_two[n]) for n in mask_one)  # the saliency all-reduce: the same top-k

    pipe = load_base_pipeline(base_dir)
    base = _params(denoiser(pipe))
    load_erasure(pipe, str(tmp_path / "two"))
    two = _params(denoiser(pipe))
    trained = _params(one.unet)
    moved, largest, apart = 0, 0.0, 0
    for name, m in mask_one.items():
        assert torch.equal(two[name][~m], base[name][~m]), name  # outside the mask: bit-identical to the base
        moved += int((two[name][m] != base[name][m]).sum())
        # AdamW moves an entry by at most lr (1 + weight_decay |w|) per step, so the two runs' gradients, equal up
        # to summation order, can put it at most LR * STEPS apart where Adam's m / sqrt(v) is ill-conditioned (a
        # gradient within a few orders of its rounding of zero); elsewhere the update's relative error is that of
        # m / sqrt(v), under 1e-4, and it adds up over the steps: at most 1e-4 * LR * STEPS apart. Ill-conditioned
        # entries are rare events over the whole model (counted there: a per-tensor floor failed on a machine whose
        # kernels round otherwise, with 4 of 23,179 over all tensors, 3 of them in one small tensor)
        diff = (two[name] - trained[name]).abs()
        largest = max(largest, float(diff.max()))
        assert float(diff.max()) <= LR * STEPS * (1 + 0.1 * float(base[name].abs().max())), name
        apart += int((diff > 1e-4 * LR * STEPS).sum())
    masked = sum(int(m.sum()) for m in mask_one.values())
    assert apart <= max(1, int(1e-3 * masked)), (apart, masked)
    assert moved > 0.5 * masked
    print(f"{family} {mode}: max |two processes - one| = {largest:.3g}")


def test_two_processes_accumulating_equal_one_process(tmp_path):
    """Two processes with 2 accumulated micro-batches each, clipping and gradient checkpointing, against one process
    accumulating 4 micro-batches that draw what they draw (micro-batch m = process m % 2's micro-batch m // 2): the
    same trained weights up to float rounding, whole model per process (DDP), sharded with --shard_weights, and
    sharded by an FSDP accelerate config (accelerate's state forced to FSDP on CPU, FSDP2 plugin: what a config gives
    on GPUs; its accumulation skips the gradient reduce-scatter until the last micro-batch) without --shard_weights,
    training the one-process mask given with --mask_path (read whole, sliced by each process);
    sharded, each process trained its own shard and every weight outside the mask is bit-identical to the base.
    DDP used to differ here by up to lr x steps on most entries (the first micro-batch's gradients were taken before
    DDP reduced them)."""
    base_dir = _base("flux", str(tmp_path / "base"))
    kw = dict(pretrained_model_name_or_path=base_dir, concept="nudity", cache_dir=str(tmp_path / "cache"),
              num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=STEPS,
              train_batch_size=2, learning_rate=LR, adam_weight_decay=0.1, mask_ratio=0.3, resolution=16, seed=0,
              save_pipeline="none", max_grad_norm=0.01, gradient_checkpointing=True)
    draw = training._step_generators
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_step_generators",
                   lambda seed, step, micro, rank, device: draw(seed, step, micro // 2, micro % 2, device))
        one = _params(erase(EraseConfig(output_dir=str(tmp_path / "one"), gradient_accumulation_steps=4, **kw)).unet)
    mask, _ = load_mask(str(tmp_path / "one" / "mask.safetensors"))
    base = _params(denoiser(load_base_pipeline(base_dir)))
    for mode, port in (("ddp", "29561"), ("sharded", "29563"), ("fsdp-forced", "29565")):
        config = tmp_path / f"{mode}.json"
        config.write_text(json.dumps(dict(kw, output_dir=str(tmp_path / mode), gradient_accumulation_steps=2,
                                          shard_weights=mode == "sharded",
                                          mask_path=str(tmp_path / "one" / "mask.safetensors")
                                          if mode == "fsdp-forced" else None)))
        how = ["fsdp-forced", str(config), "2"] if mode == "fsdp-forced" else ["erase", str(config)]
        proc = _torchrun(port, *how, str(tmp_path / f"{mode}-shards"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        if mode != "ddp":
            _check_shards(str(tmp_path / f"{mode}-shards"), computed=mode == "sharded")
        pipe = load_base_pipeline(base_dir)
        load_erasure(pipe, str(tmp_path / mode))
        two = _params(denoiser(pipe))
        assert all(torch.equal(two[n][~m], base[n][~m]) for n, m in mask.items()), mode
        # float rounding only (measured 6e-7 both ways, margin kept for Adam's sensitivity to near-zero gradients);
        # a wrong reduction puts most entries ~lr apart (measured 0.056)
        largest = max(float((two[n] - one[n]).abs().max()) for n in mask)
        assert largest < 1e-2 * LR, (mode, largest)
        print(f"accumulating, {mode}: max |two processes - one| = {largest:.3g}")


@pytest.mark.parametrize("family,scope,port,change", [
    ("flux", "layer", "29581", dict(saliency_retain_weight=0.5, num_retain_images=2)),
    ("unet", "global", "29583", dict(saliency_combine="normalized", concepts=[{"forget_prompt": "a dragon",
                                                                               "pseudo_prompt": "a lizard"}])),
])
def test_sharded_saliency_equals_one_process(family, scope, port, change, tmp_path):
    """The sharded saliency pass (``--shard_weights --save_mask_only``), 3 saliency batches (per concept) over two
    processes (an odd count: process 1 runs a zero-weighted backward to match process 0's two, and nothing hangs),
    against one process: the saliency each process selects from is its shard (dim 0, rank order) of the one-process
    saliency up to float32 summation order, and the mask, selected by the distributed top-k and gathered by process
    0, selects exactly round(ratio x numel) entries (globally, or per tensor) and equals the one-process mask except
    at entries whose saliency is within that rounding of the threshold. FLUX with a retain-aware saliency and a mask
    per tensor, the U-Net with two concepts' saliencies normalized and summed (both use totals over all weights:
    all-reduced) and a global mask."""
    from salun_diffusers.erasure import saliency as phase

    base_dir = _base(family, str(tmp_path / "base"))
    kw = dict(dict(pretrained_model_name_or_path=base_dir, concept="nudity", cache_dir=str(tmp_path / "cache"),
                   num_forget_images=3, num_retain_images=0, saliency_batch_size=1, data_num_inference_steps=2,
                   mask_ratio=0.3, mask_scope=scope, resolution=16, seed=0, save_pipeline="none",
                   save_mask_only=True), **change)
    found = {}
    with pytest.MonkeyPatch.context() as mp:
        select = phase.mask_from_saliency
        mp.setattr(phase, "mask_from_saliency", lambda s, *a, **k: select(found.setdefault("one", s), *a, **k))
        erase(EraseConfig(output_dir=str(tmp_path / "one"), **kw))
    one = found["one"]
    config = tmp_path / "two.json"
    config.write_text(json.dumps(dict(kw, output_dir=str(tmp_path / "two"), shard_weights=True)))
    proc = _torchrun(port, "erase", str(config), str(tmp_path / "rec"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [torch.load(tmp_path / f"rec.saliency.{rank}.pt") for rank in (0, 1)]
    assert sum(s.numel() for s in shards[0].values()) < sum(s.numel() for s in one.values())  # shards, not copies

    # float32 sums of 3 per-batch gradients in another order (and float64 totals over all weights): rounding of
    # ~1e-7 of their magnitude per addition, bounded here by 1e-5 of the tensor's largest saliency
    tol = {n: 1e-5 * float(s.max()) for n, s in one.items()}
    worst = 0.0
    for n, s in one.items():
        two = torch.cat([shards[0][n], shards[1][n]])
        diff = float((two - s).abs().max())
        assert diff <= tol[n], (n, diff, tol[n])
        worst = max(worst, diff / max(float(s.max()), 1e-30))

    mask_one, _ = load_mask(str(tmp_path / "one" / "mask.safetensors"))
    mask_two, meta = load_mask(str(tmp_path / "two" / "mask.safetensors"))
    assert meta["scope"] == scope and set(mask_two) == set(one)
    ratio, flat = 0.3, {n: s.reshape(-1) for n, s in one.items()}
    if scope == "global":
        k = round(ratio * sum(f.numel() for f in flat.values()))
        assert sum(int(m.sum()) for m in mask_two.values()) == k
        threshold = dict.fromkeys(one, float(torch.cat(list(flat.values())).topk(k).values[-1]))
    else:
        for n, m in mask_two.items():
            assert int(m.sum()) == max(1, round(ratio * m.numel())), n
        threshold = {n: float(f.topk(max(1, round(ratio * f.numel()))).values[-1]) for n, f in flat.items()}
    differ = 0
    for n, m in mask_one.items():
        where = mask_two[n] != m
        differ += int(where.sum())
        assert bool(((one[n][where] - threshold[n]).abs() <= tol[n]).all()), n  # only near the threshold
    assert differ <= 4, differ
    print(f"sharded saliency {family} {scope}: max |two - one| / max = {worst:.3g}, mask entries differing: {differ}")


@pytest.mark.parametrize("nan_rank,port,extra", [
    ("-", "29591", ["--alpha", "1e300"]),  # the loss is inf at step 1 in both processes
    ("1", "29593", []),  # process 1's loss is NaN at step 2, process 0's finite
])
def test_sharded_divergence_stops_every_process_in_one_line(nan_rank, port, extra, tmp_path):
    """A non-finite loss in a sharded run (train_erase.py --shard_weights, two processes started without torchrun,
    which would end the others when one fails): every process ends by itself with exit code 2 (a diverged run) and
    one line "training diverged at step N: the loss is ... in process R" on stderr, no traceback, and no erasure is
    written; also when only one process's loss is non-finite (the decision is all-reduced: a process stopping alone
    left the other waiting in backward's reduce-scatter)."""
    from salun_diffusers.delta import WEIGHTS_NAME

    base_dir = _base("flux", str(tmp_path / "base"))
    out = tmp_path / "out"
    codes, errs = _cli(port, _cli_args(base_dir, tmp_path, "--max_train_steps", "3", *extra), nan_rank=nan_rank)
    step, bad, bad_rank = ("1", "inf", "0") if nan_rank == "-" else ("2", "nan", "1")
    for line in _error_lines(codes, errs, 2):
        assert line.startswith(f"training diverged at step {step}: the loss is {bad} in process {bad_rank}; no "
                               "erasure was written"), line
    assert not os.path.exists(out / WEIGHTS_NAME)


def _cli_args(base_dir: str, tmp_path, *extra) -> list:
    """train_erase.py arguments of a sharded run on the tiny pipeline ``base_dir`` into ``tmp_path / "out"``."""
    return ["--pretrained_model_name_or_path", base_dir, "--concept", "nudity", "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "out"), "--num_forget_images", "4", "--num_retain_images", "4",
            "--data_num_inference_steps", "2", "--train_batch_size", "2", "--resolution", "16", "--seed", "0",
            "--save_pipeline", "none", "--shard_weights", *extra]


def _cli(port: str, argv: list, processes: int = 2, nan_rank: str = "-"):
    """``train_erase.main(argv)`` in ``processes`` processes started without torchrun (which would end the others
    when one fails), each ending by itself (a process left waiting times out here): their exit codes and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONPATH=ROOT,
               WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    procs = [subprocess.Popen([sys.executable, SCRIPT, "cli", nan_rank, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(processes)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], errs


def _error_lines(codes: list, errs: list, code: int) -> list:
    """Each process's one error line (without the program's prefix), after checking it exited with ``code``, wrote
    exactly one such line and no traceback."""
    out = []
    for rank, (returncode, err) in enumerate(zip(codes, errs)):
        lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("train_erase.py: error: ")]
        assert returncode == code and len(lines) == 1 and "Traceback" not in err, (rank, returncode, err[-3000:])
        out.append(lines[0][len("train_erase.py: error: "):])
    return out


def test_sharded_run_resumes_bit_identical(tmp_path):
    """Issue 20: a two-process sharded run (train_erase.py --shard_weights, tiny FLUX, 4 steps of 2 accumulated
    micro-batches, a warmed-up cosine lr, weight decay) checkpointing every 2 steps writes checkpoint-2 as one sealed
    folder holding each process's part (rank-0.pt, rank-1.pt); killed after it (its final outputs dropped) and
    resumed with --resume_from_checkpoint latest, it ends bit-identical to the uninterrupted run (torch.equal on every
    weight: the same masked values, Adam moments, lr schedule and per-step draws), every weight outside the mask
    bit-identical to the base. Resuming with 3 processes, or from a checkpoint whose rank-1.pt lost a byte, is
    refused by every process in one line (exit 2) naming the fix, and nothing is written."""
    from salun_diffusers.delta import WEIGHTS_NAME
    from salun_diffusers.erasure.checkpoints import RECORD_NAME

    base_dir = _base("flux", str(tmp_path / "base"))
    out = tmp_path / "out"
    argv = _cli_args(base_dir, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate",
                     str(LR), "--adam_weight_decay", "0.1", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
                     "--gradient_accumulation_steps", "2")
    codes, errs = _cli("29601", argv)
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert sorted(os.listdir(out / "checkpoint-2")) == ["rank-0.pt", "rank-1.pt", RECORD_NAME]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    pipe = load_base_pipeline(base_dir)
    base = _params(denoiser(pipe))
    load_erasure(pipe, str(out))
    whole = _params(denoiser(pipe))
    mask, _ = load_mask(str(out / "mask.safetensors"))
    for name in ("erasure.safetensors", "erasure_config.json"):  # a run killed after its last checkpoint
        os.remove(out / name)

    resume = [*argv, "--resume_from_checkpoint", "latest"]
    codes, errs = _cli("29603", resume, processes=3)
    for line in _error_lines(codes, errs, 2):
        assert line.startswith(f"checkpoint '{out / 'checkpoint-2'}' was written by 2 sharded processes and this "
                               "run has 3: resume it with 2 (accelerate launch --num_processes 2"), line
    rank_1 = out / "checkpoint-2" / "rank-1.pt"
    good = rank_1.read_bytes()
    rank_1.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    codes, errs = _cli("29605", resume)
    for line in _error_lines(codes, errs, 2):
        assert line.startswith(f"checkpoint '{out / 'checkpoint-2'}' is damaged: rank-1.pt changed since it was "
                               "written (sha256 mismatch); delete the folder"), line
    assert not os.path.exists(out / WEIGHTS_NAME)
    rank_1.write_bytes(good)

    codes, errs = _cli("29607", resume)
    assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert all(f"resuming from {out / 'checkpoint-2'}" in err for err in errs)  # not started afresh
    pipe = load_base_pipeline(base_dir)
    load_erasure(pipe, str(out))
    resumed = _params(denoiser(pipe))
    differ = [n for n in whole if not torch.equal(resumed[n], whole[n])]
    assert not differ, differ
    assert all(torch.equal(resumed[n][~m], base[n][~m]) for n, m in mask.items())
    assert sum(int((resumed[n][m] != base[n][m]).sum()) for n, m in mask.items()) > 0


def test_a_sharded_checkpoint_failing_in_one_process_stops_both(tmp_path):
    """A sharded checkpoint write that fails in process 1 only (its state cannot be pickled) stops both processes,
    none left waiting: process 1 with its own error, process 0 naming process 1; the failed checkpoint-4 is never
    renamed into place (only its .tmp- folder, cleared by the next run, is left) and checkpoint-2 is kept although
    --checkpoints_total_limit is 1. A restore that fails in process 1 only stops both alike, each in one line naming
    rank-1.pt and the folder to delete."""
    out = tmp_path / "out"
    proc = _torchrun("29609", "checkpoint-faults", str(out), str(tmp_path / "rec"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads((tmp_path / f"rec.{rank}.json").read_text()) for rank in (0, 1)]
    assert found[0]["save"] == ("OSError: checkpoint-4 was not written: process 1 failed writing it (its error is in "
                                "its output); earlier checkpoints are kept"), found
    assert "pickle" in found[1]["save"] and "OSError" not in found[1]["save"], found
    assert sorted(os.listdir(out)) == [".tmp-checkpoint-4", "checkpoint-2"]
    assert sorted(os.listdir(out / "checkpoint-2")) == ["rank-0.pt", "rank-1.pt", "salun_checkpoint.json"]
    where = f"checkpoint '{out / 'checkpoint-2'}': rank-1.pt cannot be resumed from"
    assert found[0]["load"].startswith(f"ValueError: {where} (process 1 says why); delete the folder"), found
    assert found[1]["load"].startswith(f"ValueError: {where} (the saved masked values are not this mask's); "
                                       "delete the folder"), found
    assert all("\n" not in f["load"] for f in found) and found[0]["restored"] == [0.0, 0.0, 0.0]


def test_accelerate_fsdp_plugin_is_not_sharding_on_cpu(tmp_path):
    """accelerate's FSDP plugin (FSDP1 FULL_SHARD with use_orig_params, and FSDP2) on two CPU processes gives a
    multi-CPU run with the module wrapped in DistributedDataParallel: on CPU an FSDP config alone does not shard, hence
    --shard_weights and the forced state below (docs/flow-models.md, "When one GPU is not enough"). Fails once
    accelerate sets FSDP on CPU: then launch the FSDP test with the plugin instead of forcing the state."""
    out = tmp_path / "probe.json"
    proc = _torchrun("29545", "fsdp-probe", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())
    for version in ("fsdp1", "fsdp2"):
        assert found[version] == {"distributed_type": "DistributedType.MULTI_CPU", "num_processes": 2,
                                  "wrapped": "DistributedDataParallel"}, found


@pytest.mark.parametrize("change,flag", [
    ({"optimizer_in_backward": True}, "--optimizer_in_backward"),
    ({"adversarial": True}, "--adversarial"),
    ({"validation_prompts": ["a cat"]}, "--validation_prompts"),
    ({"mixed_precision": "fp16"}, "--mixed_precision fp16"),
])
def test_sharding_refuses_what_it_does_not_do(change, flag):
    """Each setting the sharded loop does not handle is refused in one line naming the flag to drop, by
    --shard_weights and by an FSDP accelerate config alike."""
    from accelerate.utils import DistributedType

    from salun_diffusers.erasure.sharding import check_sharding

    for shard, kind in ((True, DistributedType.MULTI_CPU), (False, DistributedType.FSDP)):
        config = EraseConfig(output_dir="out", shard_weights=shard, **change)
        with pytest.raises(ValueError, match=f"^{re.escape(flag)} does not work with .*drop {re.escape(flag)}, or"):
            check_sharding(config, SimpleNamespace(num_processes=2, distributed_type=kind))
    check_sharding(EraseConfig(output_dir="out", shard_weights=True),
                   SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))  # the rest runs


def test_shard_weights_in_one_process_is_refused_in_one_line(tmp_path, capsys):
    """--shard_weights with one process: exit 2, one line naming the fix, before any image is drawn."""
    from train_erase import main

    base_dir = save_flow_pipeline(str(tmp_path / "base"), "flux")
    capsys.readouterr()
    code = main(["--pretrained_model_name_or_path", base_dir, "--concept", "nudity", "--cache_dir",
                 str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--shard_weights",
                 "--num_forget_images", "2", "--resolution", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "--shard_weights shards the weights over processes but this run has one" in err
    assert not any(f.endswith(".png") for _, _, files in os.walk(tmp_path / "cache") for f in files)


@pytest.mark.parametrize("flags", [dict(save_mask_only=True), dict(max_train_steps=1), dict(method="uce")])
def test_every_way_out_of_erase_leaves_the_group_together(flags, erase_config, dummy_pipeline_dir, tmp_path):
    """Each return of ``erase`` (a mask only, a whole erasure, a peer method) ends with every process waiting for the
    others and then leaving: a process that returned while the main one still read the mask back tore gloo down
    under it (SIGABRT at exit, once in CI on ``--save_mask_only``). One process, its accelerator's calls recorded."""
    from accelerate import Accelerator

    calls = []

    class Recording(Accelerator):
        def wait_for_everyone(self):
            calls.append("wait")
            super().wait_for_everyone()

        def end_training(self):
            calls.append("end")
            super().end_training()

    config = (EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", method="uce",
                          output_dir=str(tmp_path / "out"), save_pipeline="none") if "method" in flags else
              erase_config(output_dir=str(tmp_path / "out"), **flags))
    erase(config, accelerator=Recording())
    assert calls[-2:] == ["wait", "end"] and calls.count("end") == 1, calls
