"""Fault injection for a training run and its output folder (issue 8): non-finite values, crashes while writing
checkpoints and outputs (including real SIGKILLs of train_erase.py), two runs into one folder, permissions, bad
folders. Each test fails on the code before these checks existed. docs/reliability.md lists the faults tried."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_erase
from salun_diffusers.config import EraseConfig
from salun_diffusers.delta import WEIGHTS_NAME
from salun_diffusers.erase import erase
from salun_diffusers.erasure import checkpoints as ckpt
from salun_diffusers.erasure import outputs
from salun_diffusers.erasure.training import TrainingDiverged
from salun_diffusers.saliency import compute_saliency

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLED_RUN = os.path.join(REPO, "tests", "scripts", "killed_run.py")


def _tiny_argv(dummy_pipeline_dir, data_cache, out, *extra):
    return ["--pretrained_model_name_or_path", dummy_pipeline_dir, "--concept", "nudity", "--output_dir", str(out),
            "--cache_dir", data_cache, "--num_forget_images", "4", "--num_retain_images", "4",
            "--data_num_inference_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-2",
            "--adam_weight_decay", "0.1", "--seed", "0", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def _error_lines(text):
    # progress bars end their lines with \r (a terminal shows the error over the bar)
    return [line for line in re.split(r"[\r\n]", text) if line.startswith("train_erase.py: error:")]


def _no_work(monkeypatch):
    """Make any start of real work (loading the base model) fail the test."""
    import salun_diffusers.erase as erase_module

    def refuse(*a, **k):
        raise AssertionError("work started before the checks")
    monkeypatch.setattr(erase_module, "load_erasure_base", refuse)


# ----------------------------------------------------------------------------------------- 1. non-finite values


@pytest.mark.parametrize("overrides", [
    {"alpha": math.nan}, {"alpha": math.inf}, {"max_grad_norm": math.nan}, {"learning_rate": math.inf},
    {"adam_beta1": math.nan}, {"adam_beta2": 1.0}, {"adam_epsilon": 0.0}, {"adam_weight_decay": -0.1},
    {"adam_weight_decay": math.inf}, {"max_grad_norm": -1.0}, {"mask_ratio": math.nan},
    {"data_guidance_scale": -math.inf}, {"lr_scheduler": "cosinus"}, {"resolution": 20},
    {"seed": -1}, {"checkpoints_total_limit": 0}, {"checkpointing_steps": -5}, {"lr_warmup_steps": -1},
    {"output_dir": ""},
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_config_refuses_non_finite_and_out_of_range_values(erase_config, overrides):
    with pytest.raises(ValueError, match=f"--{next(iter(overrides))}"):
        erase_config(**overrides)


def _rc(argv):
    """train_erase.main's exit code, whether returned or raised by argparse (SystemExit)."""
    try:
        return train_erase.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv", [["--alpha", "nan"], ["--alpha", "inf"], ["--max_grad_norm", "nan"],
                                  ["--alpha", "x"], ["--alpah", "1"], ["--mask_ratio", "2"]],
                         ids=lambda argv: "=".join(argv))
def test_train_erase_bad_values_one_line_exit_2_no_erasure(argv, dummy_pipeline_dir, data_cache, tmp_path, capsys):
    out = tmp_path / "out"
    assert _rc(_tiny_argv(dummy_pipeline_dir, data_cache, out, "--max_train_steps", "1", *argv)) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "Traceback" not in err and "usage:" not in err
    assert not os.path.exists(out / WEIGHTS_NAME)


def test_debug_flag_shows_the_traceback():
    with pytest.raises(ValueError, match="--alpha must be a finite number"):
        train_erase.main(["--alpha", "nan", "--debug"])


def test_a_loss_that_blows_up_stops_the_run_without_an_erasure(erase_config, tmp_path, capsys):
    # alpha=1e300 is a finite float but overflows float32: the retain term, hence the loss, is inf at step 1
    cfg = erase_config(output_dir=str(tmp_path / "out"), alpha=1e300)
    with pytest.raises(TrainingDiverged, match=r"step 1: the loss is inf.*--learning_rate"):
        erase(cfg)
    assert not os.path.exists(os.path.join(cfg.output_dir, WEIGHTS_NAME))
    assert not os.path.exists(os.path.join(cfg.output_dir, "unet"))


def test_divergence_keeps_the_last_good_checkpoint_and_writes_no_erasure(erase_config, tmp_path, monkeypatch):
    import salun_diffusers.erasure.training as training

    real, calls = training.salun_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss, forget, retain = real(*args, **kwargs)
        return (loss * math.nan if len(calls) == 3 else loss), forget, retain
    monkeypatch.setattr(training, "salun_loss", nan_at_step_3)
    cfg = erase_config(output_dir=str(tmp_path / "out"), max_train_steps=4, checkpointing_steps=1)
    with pytest.raises(TrainingDiverged, match="step 3: the loss is nan"):
        erase(cfg)
    assert ckpt.list_checkpoints(cfg.output_dir) == ["checkpoint-1", "checkpoint-2"]
    assert not os.path.exists(os.path.join(cfg.output_dir, WEIGHTS_NAME))
    from safetensors.torch import load_file

    state = load_file(os.path.join(cfg.output_dir, "checkpoint-2", "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_non_finite_gradient_stops_the_run(erase_config, tmp_path, max_grad_norm):
    from salun_diffusers.families import load_erasure_base

    cfg = erase_config(output_dir=str(tmp_path / "out"), max_grad_norm=max_grad_norm, max_train_steps=2,
                       mask_ratio=1.0)
    pipe = load_erasure_base(cfg)
    # the loss stays finite, the gradient of one weight does not (as when a backward pass overflows)
    pipe.unet.conv_in.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises((TrainingDiverged, FloatingPointError), match="not finite|is (inf|nan)"):
        erase(cfg, pipe=pipe)
    assert not os.path.exists(os.path.join(cfg.output_dir, WEIGHTS_NAME))


def test_a_non_finite_gradient_stops_a_run_stepping_in_backward(erase_config, tmp_path):
    from salun_diffusers.families import load_erasure_base

    masked = erase(erase_config(output_dir=str(tmp_path / "mask"), save_mask_only=True, mask_ratio=1.0))
    cfg = erase_config(output_dir=str(tmp_path / "out"), optimizer_in_backward=True, max_train_steps=2,
                       mask_ratio=1.0, mask_path=masked.mask_path)  # a given mask: no saliency pass to trip first
    pipe = load_erasure_base(cfg)
    pipe.unet.conv_in.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(TrainingDiverged, match=r"step 1: the gradient of 'conv_in.weight' is (inf|nan)"):
        erase(cfg, pipe=pipe)
    assert not os.path.exists(os.path.join(cfg.output_dir, WEIGHTS_NAME))


def test_a_non_finite_saliency_is_refused():
    model = torch.nn.Linear(3, 2)
    model.weight.register_hook(lambda g: g * math.inf)

    def loss_fn(m, batch, generator):
        return m(torch.ones(1, 3)).sum()
    with pytest.raises(FloatingPointError, match="saliency.*'weight'.*not finite"):
        compute_saliency(model, [0], loss_fn)


def test_train_erase_exits_2_on_divergence_with_one_line(dummy_pipeline_dir, data_cache, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _tiny_argv(dummy_pipeline_dir, data_cache, out, "--max_train_steps", "2", "--alpha", "1e300")
    assert train_erase.main(argv) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "diverged at step 1" in err and "Traceback" not in err
    assert not os.path.exists(out / WEIGHTS_NAME)


def test_out_of_memory_is_one_line_with_the_fix(monkeypatch, tmp_path, capsys):
    import salun_diffusers.erase as erase_module

    def oom(config, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    monkeypatch.setattr(erase_module, "erase", oom)
    assert train_erase.main(["--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "--gradient_checkpointing" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- 4-6. checkpoints and resume


def test_half_written_checkpoint_is_skipped_on_resume(erase_config, tmp_path):
    full = erase(erase_config(output_dir=str(tmp_path / "full"), max_train_steps=4, checkpointing_steps=2))
    cfg = erase_config(output_dir=str(tmp_path / "run"), max_train_steps=4, checkpointing_steps=2)
    erase(cfg)
    out = cfg.output_dir
    # a run killed while writing checkpoint-3: a folder with only its model file (as an older version left it), and
    # this version's temporary folder
    for name in ("checkpoint-3", ".tmp-checkpoint-3"):
        os.makedirs(os.path.join(out, name))
        with open(os.path.join(out, name, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
    os.makedirs(os.path.join(out, ".tmp-unet-ab12cd_9"))  # a killed run's staged unet/ (mkdtemp name)
    with open(os.path.join(out, ".tmp-notes.txt"), "w") as f:  # not a name this package makes: kept
        f.write("mine")
    for name in (WEIGHTS_NAME, "erasure_config.json"):
        os.remove(os.path.join(out, name))
    assert ckpt.list_checkpoints(out) == ["checkpoint-2"]
    resumed = erase(erase_config(output_dir=out, max_train_steps=4, checkpointing_steps=2,
                                 resume_from_checkpoint="latest"))
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)
    assert not os.path.exists(os.path.join(out, ".tmp-checkpoint-3"))  # cleared by the next run
    assert not os.path.exists(os.path.join(out, ".tmp-unet-ab12cd_9"))
    assert open(os.path.join(out, ".tmp-notes.txt")).read() == "mine"
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.resolve_resume(erase_config(output_dir=out, resume_from_checkpoint="checkpoint-3"))


def test_pruning_waits_until_the_new_checkpoint_is_complete(erase_config, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def crash_on_second(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError("disk died while writing the checkpoint")
        return real(self, output_dir, **kwargs)
    monkeypatch.setattr(Accelerator, "save_state", crash_on_second)
    cfg = erase_config(output_dir=str(tmp_path / "out"), max_train_steps=6, checkpointing_steps=2,
                       checkpoints_total_limit=1)
    with pytest.raises(OSError, match="disk died"):
        erase(cfg)
    assert ckpt.list_checkpoints(cfg.output_dir) == ["checkpoint-2"]  # the old one survives the failed new one
    assert ckpt.read_record(os.path.join(cfg.output_dir, "checkpoint-2"))["concept"] == "nudity"


def test_resume_with_other_settings_is_refused_naming_them(erase_config, tmp_path):
    out = str(tmp_path / "out")
    erase(erase_config(output_dir=out, max_train_steps=2, checkpointing_steps=1))
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in (WEIGHTS_NAME, "mask.safetensors")}
    with pytest.raises(ValueError, match=r"learning_rate 0\.01 \(now 0\.001\); alpha 0\.1 \(now 0\.5\)\. "):
        erase(erase_config(output_dir=out, max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest",
                           alpha=0.5, learning_rate=1e-3))
    with pytest.raises(ValueError, match="forget_prompt"):
        erase(erase_config(output_dir=out, max_train_steps=2, resume_from_checkpoint="latest", concept="dragons",
                           forget_prompt="a dragon", pseudo_prompt=["a lizard"], retain_prompt=["a castle"]))
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in before} == before
    # bookkeeping fields may differ
    erase(erase_config(output_dir=out, max_train_steps=2, resume_from_checkpoint="latest", checkpointing_steps=3,
                       checkpoints_total_limit=4, save_merged_unet=False, save_pipeline="none"))


def test_resume_latest_without_checkpoints_does_not_overwrite_another_runs_outputs(erase_config, tmp_path):
    out = str(tmp_path / "out")
    erase(erase_config(output_dir=out, max_train_steps=1))
    stamp = os.path.getmtime(os.path.join(out, WEIGHTS_NAME))
    with pytest.raises(ValueError, match="alpha"):
        erase(erase_config(output_dir=out, max_train_steps=1, resume_from_checkpoint="latest", alpha=0.7))
    assert os.path.getmtime(os.path.join(out, WEIGHTS_NAME)) == stamp


def _flip_bytes(path, n=16):
    data = bytearray(open(path, "rb").read())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_older_one_resumes_exactly(
        erase_config, dummy_pipeline_dir, data_cache, tmp_path, capsys):
    full = erase(erase_config(output_dir=str(tmp_path / "full"), max_train_steps=5))
    out = tmp_path / "run"
    erase(erase_config(output_dir=str(out), max_train_steps=5, checkpointing_steps=2))
    assert ckpt.list_checkpoints(str(out)) == ["checkpoint-2", "checkpoint-4"]
    record = ckpt._read_record_file(str(out / "checkpoint-4"))
    assert "optimizer.bin" in record["sha256"] and "model.safetensors" in record["sha256"]
    _flip_bytes(out / "checkpoint-4" / "optimizer.bin")  # 16 flipped bytes of Adam's moments: no NaN, no error
    argv = _tiny_argv(dummy_pipeline_dir, data_cache, out, "--max_train_steps", "5", "--resume_from_checkpoint",
                      "latest")
    stamp = os.path.getmtime(out / WEIGHTS_NAME)
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"checkpoint '.*checkpoint-4' is damaged: optimizer\.bin changed since it was written "
                     r"\(sha256 mismatch\); delete the folder '.*checkpoint-4' and rerun \(--resume_from_checkpoint "
                     r"latest then resumes from checkpoint-2\)", lines[0]), lines[0]
    assert os.path.getmtime(out / WEIGHTS_NAME) == stamp  # nothing written
    # the fix the line names: delete the damaged folder; latest then takes checkpoint-2 and matches the full run
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    resumed = erase(erase_config(output_dir=str(out), max_train_steps=5, resume_from_checkpoint="latest"))
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)
    # a file removed from, or added to, a sealed checkpoint; an unreadable record
    os.remove(out / "checkpoint-2" / "scheduler.bin")
    with pytest.raises(ValueError, match=r"scheduler\.bin is missing; delete the folder .* starts afresh"):
        ckpt.resolve_resume(erase_config(output_dir=str(out), max_train_steps=5, resume_from_checkpoint="checkpoint-2"))
    erase(erase_config(output_dir=str(out), max_train_steps=5, checkpointing_steps=2, overwrite_output_dir=True))
    (out / "checkpoint-4" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt was added"):
        ckpt.resolve_resume(erase_config(output_dir=str(out), max_train_steps=5, resume_from_checkpoint="latest"))
    (out / "checkpoint-4" / ckpt.RECORD_NAME).write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="salun_checkpoint.json cannot be read"):
        ckpt.resolve_resume(erase_config(output_dir=str(out), max_train_steps=5, resume_from_checkpoint="latest"))


# -------------------------------------------------------------------------------------- 7. one writer per folder


def _hold_lock(folder):
    code = ("import sys, time; from salun_diffusers.erasure.outputs import output_lock\n"
            f"with output_lock({str(folder)!r}):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_into_a_busy_output_dir_is_refused_and_kill_9_frees_it(
        dummy_pipeline_dir, data_cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        assert train_erase.main(_tiny_argv(dummy_pipeline_dir, data_cache, out, "--max_train_steps", "1")) == 2
        err = capsys.readouterr().err
        assert len(_error_lines(err)) == 1 and f"pid {holder.pid}" in err and "in use by another run" in err
        assert not os.path.exists(out / "train_config.json")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with outputs.output_lock(str(out)):  # the OS released the dead holder's lock: nothing stale
        pass


# ------------------------------------------------------------------------------------------ atomic outputs, umask


def test_a_crash_while_writing_the_merged_unet_leaves_the_old_one(erase_config, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    erase(erase_config(output_dir=out, max_train_steps=1))
    unet_file = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
    old = open(unet_file, "rb").read()
    from diffusers import UNet2DConditionModel

    def half_write(self, path, **kwargs):
        with open(os.path.join(path, "diffusion_pytorch_model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError("killed while writing unet")
    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", half_write)
    with pytest.raises(OSError, match="killed while writing"):
        erase(erase_config(output_dir=out, max_train_steps=2, overwrite_output_dir=True))
    assert open(unet_file, "rb").read() == old
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".old-"))]


def test_output_files_follow_the_umask(erase_config, tmp_path):
    old = os.umask(0o002)
    try:
        cfg = erase_config(output_dir=str(tmp_path / "out"), max_train_steps=2, checkpointing_steps=1)
        erase(cfg)
    finally:
        os.umask(old)
    modes = {}
    for root, dirs, files in os.walk(cfg.output_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # --save_pipeline link: the base's files, not ours
                modes[os.path.relpath(path, cfg.output_dir)] = os.stat(path).st_mode & 0o777
    for rel in (WEIGHTS_NAME, "mask.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "checkpoint-1/model.safetensors", "metrics.json"):
        assert modes[rel] == 0o664, (rel, oct(modes[rel]))
    assert {rel: oct(m) for rel, m in modes.items() if m not in (0o664, 0o775)} == {}


# ------------------------------------------------------------------------------------------ check before compute


def test_unwritable_output_dir_is_refused_before_any_work(erase_config, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--output_dir .* cannot be created or written"):
        erase(erase_config(output_dir=str(blocker / "out")))
    with pytest.raises(ValueError, match="--cache_dir .* cannot be created or written"):
        erase(erase_config(output_dir=str(tmp_path / "out"), cache_dir="/proc/no-such-cache"))


def test_too_little_disk_space_is_refused_before_any_work(erase_config, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    _no_work(monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ValueError, match="GiB free but the run needs"):
        erase(erase_config(output_dir=str(tmp_path / "out"), checkpointing_steps=1))


def test_unreadable_inputs_are_refused_before_any_work(erase_config, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    bad_mask = tmp_path / "mask.safetensors"
    bad_mask.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a readable safetensors mask"):
        erase(erase_config(output_dir=str(tmp_path / "out"), mask_path=str(bad_mask)))
    not_a_folder = tmp_path / "images.txt"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="--forget_data_dir .* cannot be read"):
        erase(erase_config(output_dir=str(tmp_path / "out"), forget_data_dir=str(not_a_folder)))


def _tree_state(folder):
    """Every path below ``folder`` with its bytes' sha256 (links as their target): to prove nothing was touched."""
    import hashlib

    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                state[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                state[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                state[rel] = "dir"
    return state


@pytest.mark.parametrize("where", ["base-itself", "link-to-base", "inside-base", "contains-base", "inside-data",
                                   "contains-data", "inside-cache", "contains-checkpoint-run"])
def test_output_dir_overlapping_what_the_run_reads_is_refused_and_nothing_touched(
        where, dummy_pipeline_dir, erase_config, tmp_path, monkeypatch):
    import shutil

    _no_work(monkeypatch)
    base = tmp_path / "models" / "tiny-sd"
    shutil.copytree(dummy_pipeline_dir, base)
    data = tmp_path / "forget"
    data.mkdir()
    (data / "0.png").write_bytes(b"not looked at")
    cache = tmp_path / "cache"
    run = tmp_path / "runs" / "a"
    (run / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "link").symlink_to(base)
    out, extra = {"base-itself": (base, {}), "link-to-base": (tmp_path / "link", {}),
                  "inside-base": (base / "unet" / "out", {}), "contains-base": (tmp_path / "models", {}),
                  "inside-data": (data / "out", {"forget_data_dir": str(data)}),
                  "contains-data": (tmp_path, {"forget_data_dir": str(data)}),
                  "inside-cache": (cache / "out", {}),
                  "contains-checkpoint-run": (tmp_path / "runs", {"resume_from_checkpoint": str(run / "checkpoint-2")}),
                  }[where]
    before = _tree_state(tmp_path)
    with pytest.raises(ValueError, match=r"--output_dir .* (is|lies inside|contains) .*which the run reads; choose an "
                                         r"--output_dir outside it"):
        erase(erase_config(pretrained_model_name_or_path=str(base), output_dir=str(out), overwrite_output_dir=True,
                           cache_dir=str(cache), **extra))
    assert _tree_state(tmp_path) == before  # nothing created, replaced or removed (not even an empty folder)


def test_output_dir_that_is_the_base_model_exits_2_with_one_line(dummy_pipeline_dir, data_cache, tmp_path, capsys):
    import shutil

    base = tmp_path / "tiny-sd"
    shutil.copytree(dummy_pipeline_dir, base)
    before = _tree_state(base)
    argv = _tiny_argv(str(base), data_cache, base, "--max_train_steps", "1", "--overwrite_output_dir")
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "--pretrained_model_name_or_path" in err and "Traceback" not in err
    assert _tree_state(base) == before


def _image_folder(folder, n=4):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_a_truncated_image_in_a_data_folder_is_named_with_the_fix(
        dummy_pipeline_dir, data_cache, tmp_path, capsys):
    forget = _image_folder(tmp_path / "forget")
    data = (forget / "2.png").read_bytes()
    (forget / "2.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert _rc(_tiny_argv(dummy_pipeline_dir, data_cache, out, "--max_train_steps", "1", "--forget_data_dir",
                          str(forget))) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"image '.*forget/2\.png' cannot be read \(.*truncated.*\); replace or remove it", lines[0])
    assert not os.path.exists(out / WEIGHTS_NAME)


@pytest.mark.parametrize("content,expected", [
    (b'{"file_name": "0.png", "text": "a \xff photo"}\n', r"metadata\.jsonl' is not UTF-8 text \(line 1, byte 34: invalid start byte"),
    (b'{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png",\n', r"metadata\.jsonl' line 2 is not a caption row"),
    (b'{"text": "a caption"}\n', r"metadata\.jsonl' line 1 is not a caption row \(no 'file_name'"),
    (b'["0.png"]\n', r"metadata\.jsonl' line 1 is not a caption row"),
], ids=["not-utf8", "bad-json", "no-file_name", "not-an-object"])
def test_a_malformed_metadata_jsonl_is_named_before_any_work(content, expected, erase_config, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    retain = _image_folder(tmp_path / "retain")
    (retain / "metadata.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=expected + r".*; fix or delete it: it must be UTF-8 text with one JSON "
                                                   r"object per line"):
        erase(erase_config(retain_data_dir=str(retain)))


def test_user_readme_in_output_dir_is_not_overwritten(erase_config, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="README.md.*--overwrite_output_dir"):
        erase(erase_config(output_dir=str(out)))
    assert (out / "README.md").read_text() == "my notes"


# ----------------------------------------------------------------------------------------------- 12. fresh machine


# imported only when the user picks that tool, which the user then installs (accelerate's trackers work the same way)
USER_CHOSEN = ("wandb", "tensorboard")


def test_every_third_party_import_is_a_declared_dependency():
    import ast
    import importlib.metadata
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {re.split(r"[<>=\[ ;]", d)[0].lower().replace("_", "-") for d in project["dependencies"]}
    declared |= {re.split(r"[<>=\[ ;]", d)[0].lower().replace("_", "-")
                 for extra in project.get("optional-dependencies", {}).values() for d in extra}
    dists = importlib.metadata.packages_distributions()
    missing = set()
    for root, _, files in os.walk(os.path.join(REPO, "salun_diffusers")):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(root, name)).read())
            for node in ast.walk(tree):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("salun_diffusers", *USER_CHOSEN):
                        continue
                    names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                    if not names & declared:
                        missing.add(f"{top} ({name})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


# ------------------------------------------------------------------------------------------ kill -9, then resume


def _killed(point, step, argv, timeout=600):
    proc = subprocess.run([sys.executable, KILLED_RUN, point, str(step), *argv], env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc


def _kill_run_setup(erase_config, dummy_pipeline_dir, data_cache, tmp_path, steps):
    """An uninterrupted in-process run's erasure, and the output folder and flags of the same run for subprocesses
    (a checkpoint every step, at most 2 kept)."""
    expected = erase(erase_config(output_dir=str(tmp_path / "reference"), max_train_steps=steps, checkpointing_steps=1,
                                  checkpoints_total_limit=2)).erasure_path
    out = tmp_path / "run"
    argv = _tiny_argv(dummy_pipeline_dir, data_cache, out, "--max_train_steps", str(steps), "--checkpointing_steps",
                      "1", "--checkpoints_total_limit", "2")
    return expected, out, argv


def _assert_same_erasure(path, expected_path):
    """Same header fields and bit-identical tensors. The bytes may differ: safetensors writes the header's fields in
    a per-process hash order, and a resumed run reads its mask back from mask.safetensors (names sorted) so the
    header's JSON lists the shapes in another order."""
    import json

    from safetensors import safe_open

    def parsed(meta):
        out = {}
        for key, value in meta.items():
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        return out
    with safe_open(str(path), "pt") as a, safe_open(str(expected_path), "pt") as b:
        assert parsed(a.metadata()) == parsed(b.metadata())
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key


def test_kill_9_while_writing_a_checkpoint_then_resume_is_bit_identical(
        erase_config, dummy_pipeline_dir, data_cache, tmp_path):
    expected, out, argv = _kill_run_setup(erase_config, dummy_pipeline_dir, data_cache, tmp_path, steps=4)
    killed = _killed("checkpoint-write", 3, argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.path.isdir(out / ".tmp-checkpoint-3") and not os.path.exists(out / "checkpoint-3")
    assert ckpt.list_checkpoints(str(out)) == ["checkpoint-1", "checkpoint-2"]
    done = _killed("never", 0, [*argv, "--resume_from_checkpoint", "latest"])
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_erasure(out / WEIGHTS_NAME, expected)


@pytest.mark.slow
def test_kill_9_at_every_point_of_a_run_then_resume_is_bit_identical(
        erase_config, dummy_pipeline_dir, data_cache, tmp_path):
    expected, out, argv = _kill_run_setup(erase_config, dummy_pipeline_dir, data_cache, tmp_path, steps=5)
    resume = ["--resume_from_checkpoint", "latest"]
    chain = [("checkpoint-write", 2, []),   # dies writing checkpoint-2          -> latest complete: 1
             ("step", 2, resume),           # dies inside step 3 (2nd step here) -> 2
             ("checkpoint-rename", 3, resume),  # checkpoint-3 complete, not renamed -> 2
             ("prune", 4, resume),          # checkpoint-4 in place, 2 not yet pruned -> 4
             ("outputs", 0, resume)]        # erasure written, unet/ not yet renamed
    for point, step, extra in chain:
        proc = _killed(point, step, [*argv, *extra])
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        complete = ckpt.list_checkpoints(str(out))
        assert all(ckpt.read_record(str(out / c)) for c in complete), point
    assert (out / WEIGHTS_NAME).exists() and not (out / "unet").exists()
    done = _killed("never", 0, [*argv, *resume])
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_erasure(out / WEIGHTS_NAME, expected)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".old-"))]


def test_lock_file_names_the_holder(tmp_path):
    folder = tmp_path / "x"
    with outputs.output_lock(str(folder)):
        text = (folder / outputs.LOCK_NAME).read_text()
        assert f"pid {os.getpid()}" in text and time.strftime("%Y-%m-%d") in text
        with pytest.raises(outputs.OutputDirBusy, match=f"pid {os.getpid()}"):
            with outputs.output_lock(str(folder)):
                pass
