"""Speed and memory features (issue 12): the thread policy, the user cache (generated data shared across output
folders, the base model's digit verdict), memory-lean masked training. Timings live in benchmarks/bench_speed.py."""

import json
import os

import pytest
import torch

from salun_diffusers import utils
from salun_diffusers.erase import erase


@pytest.fixture
def fresh_threads(monkeypatch):
    monkeypatch.setitem(utils._threads_state, "requested", None)
    monkeypatch.setitem(utils._threads_state, "logged", None)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_policy_small_model_one_thread_flag_and_env_win(fresh_threads, monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils, "available_cores", lambda: 4)
    torch.set_num_threads(3)
    with caplog.at_level("INFO", logger="salun_diffusers.utils"):
        assert utils.configure_threads(1_000_000) == 1 == torch.get_num_threads()  # the digit U-Net's size
        assert utils.configure_threads(860_000_000) == 4 == torch.get_num_threads()  # SD1.4's size: every core
        utils.configure_threads(860_000_000)
    assert sum("torch threads" in r.message for r in caplog.records) == 2  # logged once per decision
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)  # what torch does at start-up with OMP_NUM_THREADS=2
    assert utils.configure_threads(1_000_000) == 2  # the user's OMP_NUM_THREADS wins over the policy
    assert utils.configure_threads(1_000_000, threads=3) == 3 == torch.get_num_threads()  # --threads wins over both
    assert utils.configure_threads(860_000_000) == 3  # and is remembered by later calls
    with pytest.raises(ValueError, match="--threads"):
        utils.configure_threads(1, threads=0)


def test_available_cores_follows_the_affinity_mask():
    assert utils.available_cores() == len(os.sched_getaffinity(0))


def test_generated_data_is_shared_across_output_dirs(erase_config, tmp_path, monkeypatch):
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("SALUN_DIFFUSERS_CACHE", str(cache))
    erase(erase_config(output_dir=str(tmp_path / "a"), cache_dir=None, save_mask_only=True))
    files = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(cache) for f in fs}
    assert sum(p.endswith(".png") for p in files) == 8 and all(p.startswith(str(cache / "data")) for p in files)
    erase(erase_config(output_dir=str(tmp_path / "b"), cache_dir=None, save_mask_only=True))
    after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(cache) for f in fs}
    assert after == files  # the second run into another folder drew nothing
    assert not os.path.exists(tmp_path / "b" / "data")


def test_data_cache_key_changes_with_the_model_files(tmp_path):
    from salun_diffusers.data_cache import generation_dir, model_signature

    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"1234")
    key = lambda: generation_dir("c", str(model), None, "p", 2, 7.5, 32, ["no", model_signature(str(model))])  # noqa
    first = key()
    assert key() == first
    (model / "w.bin").write_bytes(b"123456")  # the weights were rewritten in place
    assert key() != first
    assert generation_dir("c", "m", None, "p", 2, 7.5, 32, ["bf16"]) != generation_dir("c", "m", None, "p", 2, 7.5,
                                                                                      32, ["no"])


def test_base_verdict_is_cached_keyed_and_a_corrupt_entry_is_rewritten(tmp_path, monkeypatch):
    from salun_diffusers import reporting
    from salun_diffusers.digits import DigitJudge, load_digit_pipeline

    pipe, judge = load_digit_pipeline(), DigitJudge.from_pretrained()
    cache = str(tmp_path / "verdicts")
    first = reporting.base_digit_scores(pipe, judge, 7, n_per_digit=2, cache_dir=cache)
    (entry,) = os.listdir(cache)
    path = os.path.join(cache, entry)

    def no_judging(*a, **k):
        raise AssertionError("the cached base verdict should have been used")

    real = reporting.digit_scores
    monkeypatch.setattr(reporting, "digit_scores", no_judging)
    again = reporting.base_digit_scores(pipe, judge, 3, n_per_digit=2, cache_dir=cache)  # any digit: one entry
    assert again["per_digit_accuracy"] == first["per_digit_accuracy"]
    assert again["unlearning_accuracy"] == 1 - first["per_digit_accuracy"][3]
    for corrupt in ("{not json", json.dumps({"key": "other", "scores": first}),
                    json.dumps({"key": json.load(open(path))["key"], "scores": {"per_digit_accuracy": {"0": 2.0}}})):
        with open(path, "w") as f:
            f.write(corrupt)
        with pytest.raises(AssertionError, match="cached base verdict"):  # not trusted: judged again
            reporting.base_digit_scores(pipe, judge, 7, n_per_digit=2, cache_dir=cache)
    monkeypatch.setattr(reporting, "digit_scores", real)
    rewritten = reporting.base_digit_scores(pipe, judge, 7, n_per_digit=2, cache_dir=cache)
    assert rewritten["per_digit_accuracy"] == first["per_digit_accuracy"]
    assert json.load(open(path))["scores"]["n_per_digit"] == 2  # the corrupt entry was rewritten
    with torch.no_grad():  # other weights -> another key (judged again, a second entry)
        next(pipe.unet.parameters()).add_(1e-3)
    reporting.base_digit_scores(pipe, judge, 7, n_per_digit=2, cache_dir=cache)
    assert len(os.listdir(cache)) == 2


def test_bundled_base_verdict_matches_its_key():
    """The shipped base-model scores are found for the bundled model (so a first run judges only the erased model)."""
    from salun_diffusers import reporting
    from salun_diffusers.digits import ASSETS_DIR, DigitJudge, load_digit_pipeline

    with open(os.path.join(ASSETS_DIR, reporting.BASE_VERDICTS_ASSET)) as f:
        entry = json.load(f)
    key = reporting._verdict_key(load_digit_pipeline(), DigitJudge.from_pretrained(), 50, reporting.EVAL_SEED,
                               reporting.VERDICT_STEPS)
    scores = reporting._valid_scores(entry, key, 50)
    assert scores is not None and scores["retained_accuracy"] >= 0.95


def test_gradient_checkpointing_gives_the_same_erasure(erase_config, tmp_path):
    plain = erase(erase_config(output_dir=str(tmp_path / "plain")))
    ckpt = erase(erase_config(output_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True))
    a, b = dict(plain.unet.named_parameters()), dict(ckpt.unet.named_parameters())
    # the recomputed activations give gradients equal up to float32 summation order; an AdamW step turns a relative
    # gradient difference d into about d * lr per step: d = 1e-3 over the run (as tests/test_erase.py's
    # optimizer_in_backward test), far below a real difference (order lr * steps)
    cfg = erase_config()
    tol = 1e-3 * cfg.learning_rate * cfg.max_train_steps
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=tol) for n in a)
    assert not ckpt.unet.is_gradient_checkpointing  # switched off again on the returned model


def test_use_8bit_adam_without_bitsandbytes_is_a_one_line_error(tmp_path, monkeypatch):
    import subprocess
    import sys

    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erasure.training import make_optimizer

    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], EraseConfig(concept="seven", use_8bit_adam=True))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "train_erase.py"), "--concept", "seven",
                           "--use_8bit_adam", "--output_dir", str(tmp_path / "o"), "--num_forget_images", "2",
                           "--num_retain_images", "0", "--max_train_steps", "1", "--verdict_images", "0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 2 and "pip install bitsandbytes" in proc.stderr and "Traceback" not in proc.stderr


def _bench_speed():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(root, "benchmarks", "bench_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_speed_gpu_path_runs_on_cpu_fallback(tmp_path):
    bench = _bench_speed()
    result = bench.main(["--parts", "gpu", "--device", "cpu", "--unet_config", "tiny", "--gpu_batch_size", "2",
                         "--work_dir", str(tmp_path), "--output", str(tmp_path / "speed.json")])
    gpu = result["gpu"]
    assert gpu["device"] == "cpu" and gpu["parameters"] > 0
    for key in ("mask_seconds", "train_s_per_step", "train_peak_gib", "sample_images_per_s"):
        assert gpu[key] > 0, key
    assert json.load(open(tmp_path / "speed.json"))["gpu"]["batch_size"] == 2
    assert "SalUn step" in bench.table(result)


def test_bench_speed_reads_what_train_erase_prints():
    """The benchmark parses train_erase.py's summary: keep the two in step."""
    from types import SimpleNamespace

    from salun_diffusers.config import EraseConfig
    from salun_diffusers.reporting import summarize_erasure

    bench = _bench_speed()
    metrics = {"mask_density": 0.5, "data_seconds": 1.5, "saliency_seconds": 0.5, "train_seconds": 20.0,
               "seconds_per_step": 0.1, "verdict_seconds": 9.5,
               "verdict": "UA 98.0% (before 0.0%); retained accuracy 97.1% (before 99.6%, drop +2.4 points); judged "
                          "on 50 images per digit"}
    text = summarize_erasure(EraseConfig(concept="seven"), SimpleNamespace(metrics=metrics, output_dir="o", erasure_path=None,
                                                                   unet_dir=None))
    t, v = bench.TIME_LINE.search(text), bench.VERDICT_LINE.search(text)
    assert [float(x) for x in t.groups()] == [1.5, 0.5, 20.0, 0.1, 9.5]
    assert [float(x) for x in v.groups()] == [98.0, 97.1, 99.6, 2.4]


def _shipped(pipe, **over):
    from salun_diffusers.concepts import PRESETS
    from salun_diffusers.digits import DIGIT_PIPELINE_DIR
    from salun_diffusers.digits import ShippedData

    d = PRESETS["seven"].defaults
    kw = dict(steps=d["data_num_inference_steps"], guidance=d["data_guidance_scale"], size=32)
    kw.update(over)
    return ShippedData(pipe, DIGIT_PIPELINE_DIR, **kw)


def test_shipped_digit_data_fills_the_cache_and_matches_what_the_model_draws(tmp_path, monkeypatch):
    """The bundled model's forget/retain images ship with the package (a first digit erasure draws none); they are
    what the model draws (two seeds redrawn here), and only used for exactly the model and settings they were made
    with."""
    from PIL import Image

    from salun_diffusers.config import EraseConfig
    from salun_diffusers.digits import load_digit_pipeline
    from salun_diffusers.erasure import data as data_mod
    from salun_diffusers.erasure.data import generate_concept_images

    pipe = load_digit_pipeline()
    shipped = _shipped(pipe)
    assert len(shipped.arrays) == 20  # ten digit prompts x (forget seeds, retain seeds)
    redrawn = generate_concept_images(pipe, "a handwritten digit seven", [0, 1], str(tmp_path / "redrawn"),
                              num_inference_steps=20, guidance_scale=4.0, size=32)
    for i, path in enumerate(redrawn):
        drawn = torch.tensor(__import__("numpy").array(Image.open(path).convert("RGB"))).int()
        ship = torch.tensor(shipped.arrays["a-handwritten-digit-seven_0"][i]).int()
        assert (drawn - ship).abs().float().mean() < 1.0, "shipped images differ from what the model draws"

    # another setting, another model: nothing shipped applies
    assert _shipped(pipe, steps=10).arrays == {}
    other = load_digit_pipeline()
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)
    assert _shipped(other).arrays == {}

    # a digit erasure's data phase with a fresh cache draws nothing
    calls = []
    real = data_mod.generate_concept_images

    def counting(pipe, prompt, seeds, out_dir, **kw):
        missing = [s for s in seeds if not os.path.exists(os.path.join(out_dir, f"{s}.png"))]
        calls.append(len(missing))
        return real(pipe, prompt, seeds, out_dir, **kw)

    monkeypatch.setattr(data_mod, "generate_concept_images", counting)
    cfg = EraseConfig(concept="seven", output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    data = data_mod.prepare_data(pipe, cfg, cfg.concept_spec())
    assert len(calls) == 10 and sum(calls) == 0  # forget + nine retain prompts, every image from the asset
    assert data.forget_latents.shape[0] == 64 and data.retain_latents.shape[0] == 288
    # files already in the cache are never overwritten, and a seed the asset lacks is drawn
    folder = os.path.dirname(next(p for p in __import__("glob").glob(str(tmp_path / "cache" / "*seven*" / "0.png"))))
    with open(os.path.join(folder, "0.png"), "rb") as f:
        before = f.read()
    assert shipped.fill("a handwritten digit seven", list(range(64)), folder) == 64
    with open(os.path.join(folder, "0.png"), "rb") as f:
        assert f.read() == before
    assert shipped.fill("a handwritten digit seven", list(range(65)), str(tmp_path / "x")) == 0  # 65 > shipped
    assert shipped.fill("a handwritten digit seven", [5, 6], str(tmp_path / "y")) == 0  # not from the first seed


@pytest.mark.parametrize("damage", ["pixel", "truncated", "no_checksum"])
def test_damaged_shipped_digit_data_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    """A changed image, a truncated file or a missing checksum: the asset is not used (the data is drawn instead)."""
    import numpy as np

    from salun_diffusers import digits
    from salun_diffusers.digits import load_digit_pipeline
    from salun_diffusers.digits import SHIPPED_DATA_ASSET

    src = os.path.join(digits.ASSETS_DIR, SHIPPED_DATA_ASSET)
    dst = tmp_path / SHIPPED_DATA_ASSET
    if damage == "truncated":
        dst.write_bytes(open(src, "rb").read()[:5000])
    else:
        with np.load(src) as z:
            arrays = {k: z[k].copy() for k in z.files}
        if damage == "pixel":
            arrays["a-handwritten-digit-seven_0"][3, 10, 10, 0] ^= 1
        else:
            del arrays["sha256"]
        np.savez_compressed(dst, **arrays)
    pipe = load_digit_pipeline()
    assert len(_shipped(pipe).arrays) == 20  # the real asset is fine
    monkeypatch.setattr(digits, "ASSETS_DIR", str(tmp_path))
    with caplog.at_level("WARNING"):
        assert _shipped(pipe).arrays == {}
    assert "generating the data instead" in caplog.text
