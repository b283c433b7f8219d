"""train_erase.py's UI exports (``--save_single_file``, the kohya LoRA beside ``--export_lora_rank``'s) and the
training environment in metrics.json / the model card, on the tiny config-built SD 1.x pipeline (SD path,
mechanical; seconds per run)."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from salun_diffusers import provenance
from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.erasure.outputs import check_before_compute, check_output_dir, single_file_path
from salun_diffusers.export import KOHYA_LORA_NAME
from salun_diffusers.families import load_base_pipeline

from train_erase import parse_args


@pytest.fixture(scope="module")
def exported(dummy_pipeline_dir, tmp_path_factory):
    """One run with both exports: float32 single file (the exact weights) and a rank-2 LoRA in two layouts."""
    out = str(tmp_path_factory.mktemp("exported") / "tiny-erased")
    config = EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", output_dir=out,
                         num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=3,
                         train_batch_size=2, learning_rate=1e-2, mask_ratio=0.3, save_single_file=True,
                         single_file_dtype="float32", export_lora_rank=2)
    return config, erase(config)


def _unet_state(folder):
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def test_flags_parse_and_defaults():
    config = parse_args(["--concept", "seven", "--save_single_file"])
    assert config.save_single_file and config.single_file_dtype == "float16"
    assert parse_args(["--concept", "seven", "--single_file_dtype", "float32"]).single_file_dtype == "float32"
    with pytest.raises(ValueError, match="single_file_dtype"):
        EraseConfig(concept="seven", single_file_dtype="bf16")


def test_single_file_of_the_run_is_the_erased_unet_bit_identical(exported):
    config, result = exported
    path = single_file_path(config)
    assert os.path.basename(path) == "tiny-erased.safetensors" and os.path.isfile(path)
    loaded = StableDiffusionPipeline.from_single_file(path, config=config.output_dir)
    erased = _unet_state(config.output_dir)
    back = loaded.unet.state_dict()
    assert set(back) == set(erased)
    assert all(torch.equal(back[k], v) for k, v in erased.items())
    base = load_base_pipeline(config.pretrained_model_name_or_path).unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in erased.items())  # the erasure is in the file
    metrics = json.load(open(os.path.join(config.output_dir, "metrics.json")))
    assert metrics["single_file"] == {"file": "tiny-erased.safetensors", "family": "sd1", "dtype": "float32",
                                      "bytes": os.path.getsize(path)}
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert "## Use in Automatic1111 or ComfyUI" in card and "`tiny-erased.safetensors`" in card
    assert KOHYA_LORA_NAME in card


def test_kohya_lora_of_the_run_gives_the_diffusers_lora_weights(exported):
    config, _ = exported
    metrics = json.load(open(os.path.join(config.output_dir, "metrics.json")))
    assert metrics["lora"]["kohya_file"] == KOHYA_LORA_NAME
    fused = []
    for name in ("pytorch_lora_weights.safetensors", KOHYA_LORA_NAME):
        pipe = load_base_pipeline(config.pretrained_model_name_or_path)
        pipe.load_lora_weights(config.output_dir, weight_name=name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused.append(pipe.unet.state_dict())
    base = load_base_pipeline(config.pretrained_model_name_or_path).unet.state_dict()
    assert all(torch.equal(fused[0][k], fused[1][k]) for k in fused[0])
    assert sum(not torch.equal(fused[0][k], base[k]) for k in base) == metrics["lora"]["layers"]


def test_training_environment_is_recorded(exported):
    config, _ = exported
    metrics = json.load(open(os.path.join(config.output_dir, "metrics.json")))
    env = metrics["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    now = provenance.environment_record()
    assert provenance.diff_records(env, now) == []
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert f"torch {env['torch']}" in card and f"diffusers {env['diffusers']}" in card


def test_half_single_file_and_the_refusals(exported, erase_config, tmp_path):
    config, _ = exported
    # an existing single file is refused before any work, replaced with --overwrite_output_dir
    clash = EraseConfig(**{**config.to_dict(), "overwrite_output_dir": False, "hub_token": None})
    with pytest.raises(FileExistsError, match="already"):
        check_output_dir(clash)
    with pytest.raises(ValueError, match="--save_mask_only"):
        check_before_compute(erase_config(save_single_file=True, save_mask_only=True))
    # a base without an original single-file layout is refused before any work
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline.*no original single-file layout"):
        check_before_compute(erase_config(save_single_file=True, pretrained_model_name_or_path=str(other)))
    # an SD pipeline whose U-Net has blocks the original layout lacks: refused before any work, naming them
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (other / "unet").mkdir()
    (other / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "layers_per_block": 1, "down_block_types": ["SimpleCrossAttnDownBlock2D"],
        "up_block_types": ["UpBlock2D"]}))
    with pytest.raises(ValueError, match="--save_single_file: U-Net down_block_types.*SimpleCrossAttnDownBlock2D"):
        check_before_compute(erase_config(save_single_file=True, pretrained_model_name_or_path=str(other)))
    # float16 (the default), without a pipeline folder: the base's components, the erased U-Net cast to half
    half = erase_config(save_single_file=True, save_pipeline="none", output_dir=str(tmp_path / "erasure"))
    result = erase(half)
    path = single_file_path(half)
    assert os.path.basename(path) == "erasure-single-file.safetensors"  # not the erasure file's name
    loaded = StableDiffusionPipeline.from_single_file(path, config=half.pretrained_model_name_or_path,
                                                      torch_dtype=torch.float16)
    erased = result.unet.state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[k], v.to(torch.float16)) for k, v in erased.items())


def test_the_exports_are_bookkeeping_a_resume_may_add_them(exported):
    from salun_diffusers.erasure.checkpoints import config_differences

    config, _ = exported
    recorded = {k: v for k, v in config.to_dict().items() if k not in ("save_single_file", "single_file_dtype")}
    assert config_differences(recorded, config) == []
