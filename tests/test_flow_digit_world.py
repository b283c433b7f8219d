"""The bundled SD3 digit world (assets/digit-sd3): a real StableDiffusion3Pipeline that draws the asked-for digit."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from salun_diffusers.digits import ASSETS_DIR, DigitJudge, judge_accuracy

SD3_DIR = os.path.join(ASSETS_DIR, "digit-sd3")
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "train_flow_digit_world.py")


def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_flow_digit_world", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_flow_digit_world", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bundled_sd3_world_draws_the_asked_digits(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    sampling = _script(monkeypatch).SD3_DIGIT_SAMPLING
    pipe = StableDiffusion3Pipeline.from_pretrained(SD3_DIR, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.shift_factor == 0.0
    with open(os.path.join(ASSETS_DIR, "digit-sd3-metrics.json")) as f:
        assert json.load(f)["generation"]["sampling"] == sampling
    # 8 images each of two digits through the pipeline's own __call__ (seeds as in the shipped metrics)
    result = judge_accuracy(pipe, DigitJudge.from_pretrained(), digits=(1, 7), n_per_digit=8, batch_size=8,
                            **sampling)
    assert result["min"] >= 0.75, result
    # an unconditional draw is not pinned to one digit: the prompt carries the class
    images = pipe([""] * 8, generator=[torch.Generator().manual_seed(i) for i in range(8)], output_type="np",
                  **sampling).images
    assert len(set(DigitJudge.from_pretrained().predict(images).tolist())) >= 2


@pytest.mark.slow
def test_flow_training_script_smoke(tmp_path, data_dir, monkeypatch):
    mod = _script(monkeypatch)
    metrics = mod.main(["--output_dir", str(tmp_path), "--mnist_dir", os.path.join(data_dir, "mnist"),
                        "--max_images", "300", "--steps", "3", "--num_layers", "1", "--eval_n_per_digit", "1"])
    assert os.path.isfile(tmp_path / "digit-sd3" / "model_index.json")
    assert os.path.isfile(tmp_path / "digit-sd3" / "tokenizer_2" / "vocab.json")
    assert metrics["generation"]["n_per_digit"] == 1 and metrics["config"]["steps"] == 3
    assert json.load(open(tmp_path / "digit-sd3-metrics.json"))["objective"]["sigma_scheme"] == "logit_normal"
