"""End-to-end SalUn erasure on a tiny config-built pipeline (CPU, seconds per run)."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from salun_diffusers import load_mask
from salun_diffusers.config import EraseConfig
from salun_diffusers.delta import WEIGHTS_NAME
from salun_diffusers.erase import erase
from salun_diffusers.loaders import fuse_erasure, load_erasure, set_erasure_scale, unload_erasure
from salun_diffusers.pipelines import StableDiffusionErasedPipeline
from salun_diffusers.testing import drop_final_outputs


def _load(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _images(pipe, prompt="a photo of a nude person"):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    return pipe([prompt] * 2, num_inference_steps=3, generator=gens, output_type="np").images


@pytest.fixture(scope="module")
def erased(dummy_pipeline_dir, tmp_path_factory):
    """One erasure run shared by the tests below (AdamW weight decay 0.1 > 0)."""
    out = str(tmp_path_factory.mktemp("erased") / "out")
    config = EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", output_dir=out,
                         num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=4,
                         train_batch_size=2, learning_rate=1e-2, adam_weight_decay=0.1, mask_ratio=0.3)
    result = erase(config)
    return config, result


def test_outputs_and_mask_density(erased):
    config, result = erased
    out = config.output_dir
    for name in ("erasure.safetensors", "erasure_config.json", "mask.safetensors", "README.md", "train_config.json",
                 "metrics.json", "unet/config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    mask, meta = load_mask(result.mask_path)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.3 * total)
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: diffusers" in card and "a photo of a nude person" in card
    assert EraseConfig.from_json_file(os.path.join(out, "train_config.json")) == config


def test_weights_outside_mask_are_bit_identical_to_base(erased, dummy_pipeline_dir):
    config, result = erased
    base = _params(_load(dummy_pipeline_dir).unet)
    mask, _ = load_mask(result.mask_path)
    changed = 0
    for name, p in result.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name][~m]), name
        changed += int((p.detach()[m] != base[name][m]).sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in mask.values())  # the salient weights did move


def test_delta_roundtrip_reproduces_the_erased_model(erased, dummy_pipeline_dir):
    config, result = erased
    erased_params = _params(result.unet)
    pipe = _load(dummy_pipeline_dir)
    base_params = _params(pipe.unet)
    base_images = _images(pipe)
    meta = load_erasure(pipe, config.output_dir)
    assert meta["config"]["concept"] == "nudity"
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in pipe.unet.named_parameters())
    erased_images = _images(pipe)
    assert not (erased_images == base_images).all()

    merged = UNet2DConditionModel.from_pretrained(config.output_dir, subfolder="unet")
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in merged.named_parameters())

    # the pipeline subclass: base model read from the erasure's config, or given explicitly
    sub = StableDiffusionErasedPipeline.from_pretrained(config.output_dir, safety_checker=None)
    sub.set_progress_bar_config(disable=True)
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in sub.unet.named_parameters())
    assert (_images(sub) == erased_images).all()
    sub2 = StableDiffusionErasedPipeline.from_pretrained(dummy_pipeline_dir, erasure=os.path.join(
        config.output_dir, WEIGHTS_NAME), safety_checker=None)
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in sub2.unet.named_parameters())

    # scale, unload, fuse
    set_erasure_scale(pipe, 0.0)
    assert all(torch.equal(p.detach(), base_params[n]) for n, p in pipe.unet.named_parameters())
    set_erasure_scale(pipe, 0.5)
    some = next(n for n in erased_params if not torch.equal(erased_params[n], base_params[n]))
    mid = dict(pipe.unet.named_parameters())[some].detach()
    torch.testing.assert_close(mid, (base_params[some] + erased_params[some]) / 2)
    unload_erasure(pipe)
    assert all(torch.equal(p.detach(), base_params[n]) for n, p in pipe.unet.named_parameters())
    assert (_images(pipe) == base_images).all()
    with pytest.raises(RuntimeError, match="no erasure is loaded"):
        unload_erasure(pipe)
    load_erasure(pipe, config.output_dir)
    with pytest.raises(RuntimeError, match="already loaded"):
        load_erasure(pipe, config.output_dir)
    fuse_erasure(pipe)
    with pytest.raises(RuntimeError, match="no erasure is loaded"):
        unload_erasure(pipe)
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in pipe.unet.named_parameters())


def test_loading_refuses_bad_erasures_before_touching_weights(erased, tmp_path):
    config, result = erased
    from salun_diffusers.testing import get_dummy_components

    other = get_dummy_components(cross_attention_dim=32)["unet"]  # different shapes
    before = _params(other)
    with pytest.raises(ValueError, match="different U-Net"):
        load_erasure(other, config.output_dir)
    assert all(torch.equal(p.detach(), before[n]) for n, p in other.named_parameters())

    same = get_dummy_components()["unet"]
    before = _params(same)
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes(open(os.path.join(config.output_dir, WEIGHTS_NAME), "rb").read()[:500])
    with pytest.raises(ValueError, match="corrupt|not a readable"):
        load_erasure(same, str(truncated))
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(config.output_dir, WEIGHTS_NAME))
    with pytest.raises(ValueError, match="unexpected key"):
        load_erasure(same, {**tensors, "conv_in.weight.extra": torch.zeros(1)})
    bad = dict(tensors)
    key = next(k for k in bad if k.endswith(".values"))
    bad[key] = bad[key][:-1]
    with pytest.raises(ValueError, match="corrupt"):
        load_erasure(same, bad)
    with pytest.raises(FileNotFoundError, match="no erasure.safetensors"):
        load_erasure(same, str(tmp_path))
    assert all(torch.equal(p.detach(), before[n]) for n, p in same.named_parameters())


def test_existing_output_is_not_overwritten(erased, erase_config):
    config, _ = erased
    stamp = os.path.getmtime(os.path.join(config.output_dir, WEIGHTS_NAME))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        erase(erase_config(output_dir=config.output_dir))
    assert os.path.getmtime(os.path.join(config.output_dir, WEIGHTS_NAME)) == stamp


def test_resume_from_checkpoint_matches_an_uninterrupted_run(erase_config, tmp_path):
    full = erase(erase_config(output_dir=str(tmp_path / "full"), max_train_steps=4))
    cfg = erase_config(output_dir=str(tmp_path / "resumed"), max_train_steps=4, checkpointing_steps=2,
                       checkpoints_total_limit=1)
    erase(cfg)
    assert sorted(d for d in os.listdir(cfg.output_dir) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    # simulate a run killed after step 2: drop its outputs, resume from the latest checkpoint
    drop_final_outputs(cfg.output_dir)
    resumed = erase(erase_config(output_dir=cfg.output_dir, max_train_steps=4, resume_from_checkpoint="latest"))
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)


def test_optimizer_in_backward_matches_masked_adamw_and_resumes_exactly(erase_config, tmp_path, dummy_pipeline_dir):
    """--optimizer_in_backward (AdamW stepped inside backward, no flat copies) trains the same erasure as the
    standard masked AdamW (lr schedule with warm-up, weight decay), leaves the weights outside the mask bit-identical,
    and a run resumed from its checkpoint equals an uninterrupted one bit for bit."""
    kw = dict(max_train_steps=4, lr_scheduler="cosine", lr_warmup_steps=2)
    standard = erase(erase_config(output_dir=str(tmp_path / "standard"), **kw))
    fused = erase(erase_config(output_dir=str(tmp_path / "fused"), optimizer_in_backward=True, **kw))
    mask, _ = load_mask(fused.mask_path)
    base = _params(_load(dummy_pipeline_dir).unet)
    a, b = dict(standard.unet.named_parameters()), dict(fused.unet.named_parameters())
    # Both paths do the same AdamW arithmetic on gradients that differ only in float32 summation order (the
    # in-backward path gathers each weight's gradient as backward makes it). An AdamW step moves a weight by about lr
    # at most (m_hat / (sqrt(v_hat) + eps) is of order one), so a relative gradient difference d changes a step by
    # about d * lr, and the run by d * lr * steps. d = 1e-3 leaves room for rounding (1e-7 per operation, amplified
    # where terms cancel; one CPU showed 1.4e-6 here), while a real divergence (a missed step, a wrong mask, lr or
    # weight decay) is of the order of lr * steps itself, a thousand times more.
    standard_cfg = erase_config(**kw)
    tol = 1e-3 * standard_cfg.learning_rate * standard_cfg.max_train_steps
    moved = 0
    for n in a:
        torch.testing.assert_close(b[n].detach(), a[n].detach(), rtol=0, atol=tol, msg=lambda m, n=n: f"{n}: {m}")
        assert torch.equal(b[n].detach()[~mask[n]], base[n][~mask[n]]), n
        moved += int((b[n].detach()[mask[n]] != base[n][mask[n]]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values())
    cfg = erase_config(output_dir=str(tmp_path / "resumed"), optimizer_in_backward=True, checkpointing_steps=2, **kw)
    erase(cfg)
    drop_final_outputs(cfg.output_dir)  # killed after step 2: resume from there
    resumed = erase(erase_config(output_dir=cfg.output_dir, optimizer_in_backward=True,
                                 resume_from_checkpoint=os.path.join(cfg.output_dir, "checkpoint-2"), **kw))
    c = dict(resumed.unet.named_parameters())
    assert all(torch.equal(b[n].detach(), c[n].detach()) for n in b)


def test_mask_reuse_cache_reuse_and_determinism(erase_config, tmp_path, data_cache):
    first = erase(erase_config(output_dir=str(tmp_path / "a"), save_mask_only=True))
    stamps = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
              for r, _, fs in os.walk(data_cache) for f in fs}
    second = erase(erase_config(output_dir=str(tmp_path / "b"), save_mask_only=True))
    assert {p: os.path.getmtime(p) for p in stamps} == stamps  # cached images reused, not regenerated
    assert not os.path.exists(os.path.join(second.output_dir, WEIGHTS_NAME))
    m1, _ = load_mask(first.mask_path)
    m2, _ = load_mask(second.mask_path)
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    reused = erase(erase_config(output_dir=str(tmp_path / "c"), mask_path=first.mask_path, max_train_steps=1,
                                gradient_accumulation_steps=2))
    m3, _ = load_mask(reused.mask_path) if os.path.exists(reused.mask_path) else (m1, None)
    assert all(torch.equal(m1[n], m3[n]) for n in m1)
    base = _params(_load(erase_config().pretrained_model_name_or_path).unet)
    for n, p in reused.unet.named_parameters():
        assert torch.equal(p.detach()[~m1[n]], base[n][~m1[n]])


def test_image_folder_data_and_bf16(erase_config, tmp_path, data_cache):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "forget"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # any size: images are resized to the pipeline's resolution
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a nude person"}) + "\n")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is per process; bf16 needs a new one
    try:
        result = erase(erase_config(output_dir=str(tmp_path / "out"), forget_data_dir=str(folder),
                                    max_train_steps=1, mixed_precision="bf16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.erasure_path and os.path.isfile(result.erasure_path)
    assert result.metrics["final"]["loss"] == result.metrics["final"]["loss"]  # finite, not NaN


@pytest.mark.parametrize("overrides, message", [
    ({"mask_ratio": 0.0}, "mask_ratio"),
    ({"concept": "nudity", "pretrained_model_name_or_path": None}, "needs a Stable Diffusion model"),
    ({"concept": "dragons"}, "unknown concept"),
    ({"concept": "dragons", "forget_prompt": "a dragon"}, "--pseudo_prompt"),
    ({"max_train_steps": 0}, "max_train_steps"),
    ({"optimizer_in_backward": True, "max_grad_norm": 1.0}, "drop --max_grad_norm or --optimizer_in_backward"),
    ({"optimizer_in_backward": True, "gradient_accumulation_steps": 2}, "drop --gradient_accumulation_steps"),
    ({"optimizer_in_backward": True, "mixed_precision": "fp16"}, "drop --mixed_precision"),
    ({"optimizer_in_backward": True, "use_8bit_adam": True}, "drop --use_8bit_adam"),
])
def test_bad_config_is_rejected_with_the_fix(erase_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        erase_config(**overrides)


@pytest.mark.parametrize("flag", ["forget_data_dir", "retain_data_dir", "mask_path"])
def test_missing_inputs_are_refused_by_the_pre_flight_checks_not_the_config(erase_config, tmp_path, flag):
    """The config never touches the disk; the pre-flight checks (before any output folder is made) name the flag."""
    from salun_diffusers.erasure.outputs import check_before_compute

    cfg = erase_config(output_dir=str(tmp_path / "out"), **{flag: "/does/not/exist"})
    with pytest.raises(ValueError, match=f"--{flag} '/does/not/exist' does not exist"):
        check_before_compute(cfg)
    assert not os.path.exists(tmp_path / "out")


def test_a_saved_train_config_loads_without_its_data_folders(tmp_path):
    """train_config.json of a run over image folders loads on a machine without them (epochs over a forget folder:
    the steps counted at the run are in the file)."""
    from salun_diffusers.erasure.data import resolve_epoch_steps

    folder = tmp_path / "forget"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"")
    cfg = EraseConfig(concept="seven", forget_data_dir=str(folder), retain_data_dir=str(folder),
                      mask_path=str(tmp_path / "mask.safetensors"), num_train_epochs=2, train_batch_size=2)
    assert cfg.max_train_steps is None  # not counted by the config: the run counts the folder
    resolve_epoch_steps(cfg)
    assert cfg.max_train_steps == 2 * 3  # 2 epochs x ceil(5 images / batch 2)
    path = str(tmp_path / "train_config.json")
    cfg.to_json_file(path)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    loaded = EraseConfig.from_json_file(path)
    assert loaded == cfg and loaded.max_train_steps == 6


def test_config_json_roundtrip_and_unknown_keys(erase_config, tmp_path):
    cfg = erase_config()
    path = str(tmp_path / "c.json")
    cfg.to_json_file(path)
    assert EraseConfig.from_json_file(path) == cfg
    with pytest.raises(ValueError, match="unknown EraseConfig keys"):
        EraseConfig.from_dict({**cfg.to_dict(), "learning_rat": 1})
