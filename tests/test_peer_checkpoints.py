"""Crash-safe checkpoints for the training peers (train_erase.py --method esd-x | esd-u | esd-full | advunlearn), on
tiny models: SalUn's checkpoint-N machinery (sealed, pruned, checked against the run's settings, a killed run's
partial checkpoint cleared) around the peers' loops; a run killed after a checkpoint and resumed ends bit-identical
to an uninterrupted run."""

import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

from salun_diffusers.config import EraseConfig
from salun_diffusers.delta import WEIGHTS_NAME, read_delta
from salun_diffusers.erase import erase
from salun_diffusers.erasure import checkpoints as ckpt
from salun_diffusers.erasure import peers
from salun_diffusers.masking import load_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4  # steps of every run; AdvUnlearn attacks from step 2 on (warmup 1), so a resume continues an attack's prefix
KNOBS = {
    "esd-x": dict(max_train_steps=N, partial_sampling_steps=3, learning_rate=1e-3),
    "advunlearn": dict(max_train_steps=N, partial_sampling_steps=3, attack_steps=2, attack_warmup=1,
                       learning_rate=1e-3),
}
COMPONENT = {"esd-x": "unet", "advunlearn": "text_encoder"}


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs (no outputs, the lock released by the OS)."""


def _config(method, base, out, **kw):
    return EraseConfig(pretrained_model_name_or_path=base, concept="nudity", method=method, output_dir=str(out),
                       save_pipeline="none", **{**KNOBS[method], **kw})


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _flip_bytes(path, n=16):
    data = bytearray(open(path, "rb").read())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def uninterrupted(dummy_pipeline_dir, tmp_path_factory):
    """Each method's run of N steps without checkpoints: the reference."""
    return {m: erase(_config(m, dummy_pipeline_dir, tmp_path_factory.mktemp(m) / "full")) for m in KNOBS}


@pytest.mark.parametrize("method, resume", [("esd-x", "latest"), ("advunlearn", "checkpoint-2")])
def test_a_killed_run_resumed_from_its_checkpoint_is_bit_identical(method, resume, uninterrupted, dummy_pipeline_dir,
                                                                    tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = peers.save_peer_checkpoint

    def save_then_die(config, step, state):
        save(config, step, state)
        if step == 2:
            raise Killed()
    monkeypatch.setattr(peers, "save_peer_checkpoint", save_then_die)
    cfg = _config(method, dummy_pipeline_dir, out, checkpointing_steps=1, checkpoints_total_limit=1)
    with pytest.raises(Killed):
        erase(cfg)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(str(out)) == ["checkpoint-2"]  # checkpoint-1 pruned once checkpoint-2 was complete
    assert not os.path.exists(out / WEIGHTS_NAME)
    record = ckpt.read_record(str(out / "checkpoint-2"))
    assert record["method"] == method and record["negative_guidance"] == 1.0  # the resolved recipe is recorded
    # a later kill while writing checkpoint-3 left its temporary folder: the next run clears it
    os.makedirs(out / ".tmp-checkpoint-3")
    (out / ".tmp-checkpoint-3" / ckpt.PEER_STATE_NAME).write_bytes(b"half a file")
    # a fresh run (the base pipeline loaded again from disk) from checkpoint-2, to the full N steps
    resumed = erase(_config(method, dummy_pipeline_dir, out, checkpointing_steps=1, checkpoints_total_limit=1,
                            resume_from_checkpoint=resume))
    assert not os.path.exists(out / ".tmp-checkpoint-3")
    full = uninterrupted[method]
    want, got = _params(full.unet), _params(resumed.unet)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert resumed.metrics["history"] == full.metrics["history"] and len(full.metrics["history"]["loss"]) == N
    a, b = read_delta(full.erasure_path)[0], read_delta(resumed.erasure_path)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # outside the method's mask every weight is the base's, bit for bit
    base = StableDiffusionPipeline.from_pretrained(dummy_pipeline_dir, safety_checker=None)
    before = _params(getattr(base, COMPONENT[method]))
    mask, _ = load_mask(resumed.mask_path)
    moved = 0
    for n, m in mask.items():
        assert torch.equal(got[n][~m], before[n][~m]), n
        moved += int((got[n][m] != before[n][m]).sum())
    assert moved > 0


def test_the_checkpoint_holds_the_loop_state_and_another_knob_is_refused(dummy_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    erase(_config("advunlearn", dummy_pipeline_dir, out, checkpointing_steps=3))
    assert ckpt.list_checkpoints(str(out)) == ["checkpoint-3"]  # none after the last step: the erasure follows
    state = ckpt.load_peer_checkpoint(str(out / "checkpoint-3"))
    assert state["step"] == 3 and len(state["history"]["loss"]) == 3
    assert state["prefix"].shape[0] == 1 and state["ids"].shape == (1, 77)  # the last attack, used until the next
    assert set(ckpt._read_record_file(str(out / "checkpoint-3"))["sha256"]) == {ckpt.PEER_STATE_NAME}  # sealed
    for knob, msg in ((dict(attack_steps=3), "attack_steps 2 (now 3)"),
                      (dict(negative_guidance=2.0), "negative_guidance 1.0 (now 2.0)"),
                      (dict(method="esd-x", attack_steps=None, attack_warmup=None),
                       "method 'advunlearn' (now 'esd-x')")):
        kw = {**KNOBS["advunlearn"], **knob}
        kw = {k: v for k, v in kw.items() if v is not None}
        with pytest.raises(ValueError) as exc:
            erase(EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", output_dir=str(out),
                              save_pipeline="none", resume_from_checkpoint="latest",
                              **{"method": "advunlearn", **kw}))
        line = str(exc.value)
        assert "\n" not in line and msg in line and "Rerun with the same settings" in line, line
    # bookkeeping flags may change: another limit and checkpoint interval resume the same run
    erase(_config("advunlearn", dummy_pipeline_dir, out, checkpointing_steps=2, checkpoints_total_limit=1,
                  resume_from_checkpoint="latest"))


def test_a_damaged_checkpoint_is_refused_in_one_line_by_the_cli(dummy_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    erase(_config("esd-x", dummy_pipeline_dir, out, checkpointing_steps=2))
    stamp = os.path.getmtime(out / WEIGHTS_NAME)
    _flip_bytes(out / "checkpoint-2" / ckpt.PEER_STATE_NAME)  # Adam's moments or trained values: no error of its own
    argv = ["--method", "esd-x", "--pretrained_model_name_or_path", dummy_pipeline_dir, "--concept", "nudity",
            "--output_dir", str(out), "--save_pipeline", "none", "--max_train_steps", str(N),
            "--partial_sampling_steps", "3", "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_erase.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("train_erase.py: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"checkpoint '.*checkpoint-2' is damaged: peer_state\.pt changed since it was written \(sha256 "
                     r"mismatch\); delete the folder .* and rerun", errors[0]), errors[0]
    assert os.path.getmtime(out / WEIGHTS_NAME) == stamp  # refused before any work: nothing was rewritten


def test_uce_still_refuses_checkpoint_flags(tmp_path):
    with pytest.raises(ValueError, match=r"--checkpointing_steps does not apply to --method uce \(uce is one "
                                         r"closed-form solve with no training steps to checkpoint"):
        EraseConfig(method="uce", checkpointing_steps=5, output_dir=str(tmp_path / "out"))
    for method in ("esd-u", "esd-full", "advunlearn"):  # the training peers accept them
        EraseConfig(method=method, checkpointing_steps=5, checkpoints_total_limit=2, resume_from_checkpoint="latest")


def test_the_advunlearn_loop_resumes_inside_an_attack_cycle(tmp_path):
    """The loop hook itself, where the last attack outlives a step (attack every 2 steps, each from the last prefix):
    its prefix and ids are part of the state, saved and read back as a checkpoint is."""
    from salun_diffusers.methods import AdvUnlearnConfig, train_advunlearn
    from salun_diffusers.testing import get_dummy_pipeline

    config = AdvUnlearnConfig(iterations=5, warmup=1, attack_every=2, attack_init="latest", attack_steps=2,
                              learning_rate=1e-3, attack_lr=1e-2, num_inference_steps=3, retain_batch=2)
    args = ("a photo of nude person", ["a photo of cat", "dog", "church"], config)

    def run(state=None, stop=None):
        pipe = get_dummy_pipeline()
        saved = {}

        def on_step(step, state_fn):
            if step == stop:
                torch.save(state_fn(), tmp_path / "state.pt")
                saved["state"] = torch.load(tmp_path / "state.pt", weights_only=True)
                raise Killed()
        try:
            history = train_advunlearn(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, *args,
                                       generator=torch.Generator().manual_seed(0), state=state, on_step=on_step)
        except Killed:
            return saved["state"], None
        return _params(pipe.text_encoder), history

    want, history = run()
    state, _ = run(stop=2)  # after the first attack (step 2), before the second (step 4)
    assert state["prefix"] is not None and state["step"] == 2
    got, resumed_history = run(state=state)
    assert resumed_history == history and all(torch.equal(got[n], want[n]) for n in want)


def test_a_non_finite_state_is_never_checkpointed(dummy_pipeline_dir, tmp_path, monkeypatch):
    import salun_diffusers.methods.esd as esd
    from salun_diffusers.erasure.training import TrainingDiverged

    real = esd.loop_state

    def poisoned(*args, **kwargs):  # a trained weight went to NaN in the step just made
        state = real(*args, **kwargs)
        if state["step"] == 2:
            next(iter(state["values"].values()))[0] = float("nan")
        return state
    monkeypatch.setattr(esd, "loop_state", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2: a trained weight is not finite; no "
                                               r"erasure was written and earlier checkpoints are kept"):
        erase(_config("esd-x", dummy_pipeline_dir, out, checkpointing_steps=1))
    assert ckpt.list_checkpoints(str(out)) == ["checkpoint-1"] and not os.path.exists(out / WEIGHTS_NAME)
