"""What each bundled digit world ships besides its weights (assets/<world>-data.npz, assets/<world>-verdict-base.json):
a first digit erasure on either world draws neither its data nor the base model's verdict, through one code path,
and a damaged asset is ignored (with a warning) and the work done as for any other model."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from salun_diffusers import digits, reporting
from salun_diffusers.config import EraseConfig
from salun_diffusers.data_cache import shipped_array_name
from salun_diffusers.digits import (BUNDLED_WORLDS, SHIPPED_DATA_SUFFIX, SHIPPED_VERDICT_SUFFIX, DigitJudge,
                                    ShippedData, bundled_world, shipped_asset)
from salun_diffusers.erasure import data as data_mod
from salun_diffusers.families import load_erasure_base
from salun_diffusers.hub import BUNDLED_MODELS

MODEL_IDS = {world: next(i for i, d in BUNDLED_MODELS.items() if d == folder)
             for world, folder in BUNDLED_WORLDS.items()}


def _config(world, tmp_path, **over):
    return EraseConfig(concept="seven", pretrained_model_name_or_path=MODEL_IDS[world],
                       output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), **over)


def _no_sampling(monkeypatch, pipe):
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was sampled")

    monkeypatch.setattr(type(pipe), "__call__", refuse)


def _same_drawing(a, b):
    """Images of one seed drawn in batches of other sizes: float summation order differs with the batch shape, which
    moves a pixel that sits on a rounding boundary by one uint8 level (measured: 2-4 of 6,144-24,576 values)."""
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def _shipped(pipe, world, **over):
    kw = {**dict(steps=20, guidance=4.0, size=32), **over}
    return ShippedData(pipe, BUNDLED_WORLDS[world], **kw)


def test_every_bundled_world_ships_its_data_and_verdict():
    for world, folder in BUNDLED_WORLDS.items():
        assert bundled_world(folder) == world and bundled_world(folder + os.sep) == world
        for suffix in (SHIPPED_DATA_SUFFIX, SHIPPED_VERDICT_SUFFIX):
            size = os.path.getsize(shipped_asset(world, suffix))
            assert size < 2_000_000, (world, suffix, size)  # small enough to ship in the package
    assert bundled_world(os.path.dirname(BUNDLED_WORLDS["digit"])) is None and bundled_world(None) is None
    # the U-Net world's names are the ones it always had
    assert shipped_asset("digit", SHIPPED_DATA_SUFFIX).endswith(digits.SHIPPED_DATA_ASSET)
    assert shipped_asset("digit", SHIPPED_VERDICT_SUFFIX).endswith(reporting.BASE_VERDICTS_ASSET)


@pytest.mark.parametrize("world", ["digit-sd3", "digit"])
def test_first_erasure_on_a_bundled_world_samples_no_base_model(world, tmp_path, monkeypatch):
    """The data phase and the base verdict of train_erase.py's digit command, with a fresh cache and the pipeline's
    sampling made to fail: every image comes from the asset, the base scores from the shipped verdict."""
    cfg = _config(world, tmp_path)
    pipe = load_erasure_base(cfg)  # as train_erase.py loads it (erasure and verdict)
    _no_sampling(monkeypatch, pipe)
    spec = cfg.concept_spec()
    data = data_mod.prepare_data(pipe, cfg, spec)
    assert data.forget_latents.shape[0] == cfg.num_forget_images == 64
    assert data.retain_latents.shape[0] == cfg.num_retain_images  # 320 (ten prompts, "" too) / 288 (nine)
    # what landed in the cache is the asset, byte for byte
    with np.load(shipped_asset(world, SHIPPED_DATA_SUFFIX)) as npz:
        shipped = npz[shipped_array_name(spec.forget_prompt, 0)]
    folder = next(p for p in (tmp_path / "cache").iterdir() if "seven" in p.name)
    assert np.array_equal(np.asarray(Image.open(folder / "63.png").convert("RGB")), shipped[63])

    acc = {d: float(d != 7) for d in range(10)}
    after = {**reporting.erasure_scores(acc, 7), "per_digit_accuracy": acc, "n_per_digit": 50}
    judged = []
    monkeypatch.setattr(reporting, "digit_scores", lambda p, *a, **k: judged.append(p) or after)
    erased = object()  # stands for the erased pipeline: the only one judged
    verdict = reporting.digit_verdict(pipe, erased, 7, 50, cache_dir=str(tmp_path / "verdicts"))
    assert judged == [erased]
    assert verdict["before"]["unlearning_accuracy"] == 0.0 and verdict["before"]["retained_accuracy"] >= 0.99
    assert not os.path.exists(tmp_path / "verdicts")  # read from the package, nothing cached


def test_sd3_shipped_data_is_what_the_world_draws_and_only_for_its_settings(tmp_path):
    cfg = _config("digit-sd3", tmp_path)
    pipe = load_erasure_base(cfg)
    shipped = _shipped(pipe, "digit-sd3")
    assert len(shipped.arrays) == 21  # ten digit prompts' forget seeds, ten + "" retain seeds
    redrawn = data_mod.generate_concept_images(pipe, "a handwritten digit seven", [0, 1], str(tmp_path / "d"),
                                               num_inference_steps=20, guidance_scale=4.0, size=32, batch_size=64,
                                               max_sequence_length=8)
    drawn = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in redrawn])
    assert _same_drawing(drawn, shipped.arrays["a-handwritten-digit-seven_0"][:2])  # what erasure/data.py draws
    # another T5 length, other steps, other weights: nothing shipped applies
    assert _shipped(pipe, "digit-sd3", sampling={"max_sequence_length": 16}).arrays == {}
    assert _shipped(pipe, "digit-sd3", steps=10).arrays == {}
    with torch.no_grad():
        next(pipe.transformer.parameters()).add_(1e-3)
    assert _shipped(pipe, "digit-sd3").arrays == {}
    # another world's folder never reads this world's file
    assert ShippedData(pipe, BUNDLED_WORLDS["digit"], 20, 4.0, 32).arrays == {}


@pytest.fixture
def drawn_counts(monkeypatch):
    """How many images each of prepare_data's generate_concept_images calls had to draw (not in the cache)."""
    counts = []
    real = data_mod.generate_concept_images

    def counting(pipe, prompt, seeds, out_dir, **kw):
        counts.append(sum(not os.path.exists(os.path.join(out_dir, f"{s}.png")) for s in seeds))
        return real(pipe, prompt, seeds, out_dir, **kw)

    monkeypatch.setattr(data_mod, "generate_concept_images", counting)
    return counts


@pytest.fixture
def assets_copy(tmp_path, monkeypatch):
    """The package's assets dir, pointed at a copy of the SD3 world's shipped files (to damage them)."""
    folder = tmp_path / "assets"
    folder.mkdir()
    for suffix in (SHIPPED_DATA_SUFFIX, SHIPPED_VERDICT_SUFFIX):
        shutil.copy(shipped_asset("digit-sd3", suffix), folder)
    monkeypatch.setattr(digits, "ASSETS_DIR", str(folder))
    return folder


def test_damaged_sd3_data_is_ignored_and_the_data_drawn(tmp_path, caplog, assets_copy, drawn_counts):
    path = assets_copy / f"digit-sd3{SHIPPED_DATA_SUFFIX}"
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    good = arrays["a-handwritten-digit-seven_0"][:2].copy()
    arrays["a-handwritten-digit-seven_0"][1, 10, 10, 0] ^= 1
    np.savez_compressed(path, **arrays)
    cfg = _config("digit-sd3", tmp_path, num_forget_images=2, num_retain_images=0)
    pipe = load_erasure_base(cfg)
    with caplog.at_level("WARNING"):
        data_mod.prepare_data(pipe, cfg, cfg.concept_spec())
    assert "do not match its checksum; generating the data instead" in caplog.text
    assert drawn_counts == [2]  # both forget images drawn, not copied
    folder = next(p for p in (tmp_path / "cache").iterdir() if "seven" in p.name)
    drawn = np.stack([np.asarray(Image.open(folder / f"{s}.png").convert("RGB")) for s in (0, 1)])
    assert _same_drawing(drawn, good)  # the redrawn images are the untampered ones


@pytest.mark.parametrize("damage", ["not json", "wrong key", "bad scores"])
def test_damaged_sd3_verdict_is_ignored_and_the_base_judged(tmp_path, monkeypatch, caplog, assets_copy, damage):
    path = assets_copy / f"digit-sd3{SHIPPED_VERDICT_SUFFIX}"
    entry = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{not json")
    elif damage == "wrong key":
        path.write_text(json.dumps({**entry, "key": "0" * 64}))
    else:
        entry["scores"]["per_digit_accuracy"]["3"] = 2.0
        path.write_text(json.dumps(entry))
    pipe = load_erasure_base(_config("digit-sd3", tmp_path))
    judge = DigitJudge.from_pretrained()
    judged = []
    fresh = {**entry["scores"], "per_digit_accuracy": {d: 0.5 for d in range(10)}}
    monkeypatch.setattr(reporting, "digit_scores", lambda p, *a, **k: judged.append(p) or fresh)
    with caplog.at_level("WARNING"):
        scores = reporting.base_digit_scores(pipe, judge, 7, 50, cache_dir=str(tmp_path / "v"),
                                             num_inference_steps=reporting.VERDICT_STEPS)
    assert judged == [pipe] and scores["retained_accuracy"] == 0.5  # judged again, not read
    assert ("not a valid verdict file" in caplog.text) == (damage != "wrong key")  # another key: another model's
    (cached,) = os.listdir(tmp_path / "v")
    assert json.load(open(tmp_path / "v" / cached))["key"] == entry["key"]  # the fresh scores cached under the key


def test_sd3_data_at_another_t5_length_is_drawn_not_copied(tmp_path, drawn_counts):
    """--max_sequence_length other than the world's own 8 draws other images: the asset (drawn at 8) must not fill
    them."""
    cfg = _config("digit-sd3", tmp_path, num_forget_images=2, num_retain_images=0, max_sequence_length=16)
    pipe = load_erasure_base(cfg)
    data_mod.prepare_data(pipe, cfg, cfg.concept_spec())
    assert drawn_counts == [2]
