"""The bundled digit world: a real MNIST-trained StableDiffusionPipeline and its digit judge."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from salun_diffusers.digits import (
    DIGIT_JUDGE_DIR, DIGIT_PIPELINE_DIR, DIGIT_SAMPLING, DIGIT_WORDS, DigitJudge, digit_prompt, generate_digits,
    judge_accuracy, judge_split, load_digit_pipeline, mnist_images)


@pytest.fixture(scope="module")
def pipe():
    return load_digit_pipeline()


@pytest.fixture(scope="module")
def judge():
    return DigitJudge.from_pretrained()


def test_prompts():
    assert DIGIT_WORDS[7] == "seven" and len(DIGIT_WORDS) == 10
    assert digit_prompt(7) == "a handwritten digit seven"
    with pytest.raises(ValueError, match="0..9"):
        digit_prompt(10)


def test_mnist_images_pads_to_rgb_in_sd_range():
    raw = np.zeros((2, 28, 28), dtype=np.uint8)
    raw[:, 10, 10] = 255
    x = mnist_images(raw)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1 and x[0, :, 12, 12].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="uint8"):
        mnist_images(raw.astype(np.float32))


def test_bundled_pipeline_is_a_plain_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DIGIT_PIPELINE_DIR)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.safety_checker is None
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)  # set from the trained latents
    assert 0.5e6 <= sum(p.numel() for p in pipe.unet.parameters()) <= 2e6
    out = pipe(["a handwritten digit three"] * 2, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and 0 <= out.images.min() and out.images.max() <= 1
    pil = pipe("a handwritten digit three", num_inference_steps=2).images[0]
    assert pil.size == (32, 32) and pil.mode == "RGB"


def test_assets_are_small():
    size = sum(os.path.getsize(os.path.join(r, f)) for d in (DIGIT_PIPELINE_DIR, DIGIT_JUDGE_DIR)
               for r, _, fs in os.walk(d) for f in fs)
    assert size < 10e6


def test_tokenizer_keeps_digit_words_whole(pipe):
    tok = pipe.tokenizer
    ids = tok("seven").input_ids
    assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(tok(digit_prompt(7)).input_ids) == 6  # bos a handwritten digit seven eos
    assert tok.model_max_length == pipe.text_encoder.config.max_position_embeddings
    for name in ("vocab.json", "merges.txt"):  # what transformers 4's slow CLIPTokenizer needs
        assert os.path.isfile(os.path.join(DIGIT_PIPELINE_DIR, "tokenizer", name))


def test_judge_heldout_accuracy(judge, data_dir):
    from salun_diffusers.data import load_mnist

    raw, labels = load_mnist(os.path.join(data_dir, "mnist"))
    split = judge.config["train_split"]
    _, held = judge_split(split["n_total"], split["seed"], split["n_train"])
    images = (mnist_images(raw[held.numpy()]) + 1) / 2
    acc = (judge.predict(images) == torch.from_numpy(labels[held.numpy()])).float().mean().item()
    assert acc >= 0.98


def test_generated_digits_are_recognised(pipe, judge):
    res = judge_accuracy(pipe, judge, digits=(3, 7), n_per_digit=8, seed=123)
    assert set(res["per_digit"]) == {3, 7} and res["n_per_digit"] == 8
    assert res["mean"] >= 0.7, res
    # a digit's images are judged as that digit, not merely "some digit": prompting 3 rarely gives 7
    sevens = judge.predict(generate_digits(pipe, 7, 8, seed=123))
    assert (sevens == 3).float().mean() <= 0.25


def test_generation_is_seeded_per_image(pipe):
    a = generate_digits(pipe, 1, 3, seed=5, batch_size=3, num_inference_steps=3)
    b = generate_digits(pipe, 1, 3, seed=5, batch_size=2, num_inference_steps=3)
    np.testing.assert_allclose(a, b, atol=1e-5)  # images in [0, 1]; batch 3 vs 2 convolutions round differently


def test_judge_accepts_pipeline_formats(judge):
    rng = np.random.default_rng(0)
    np_images = rng.random((3, 32, 32, 3)).astype(np.float32)
    pil = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in np_images]
    pt = torch.from_numpy(np_images).permute(0, 3, 1, 2)
    p_np, p_pt, p_pil = judge.predict_proba(np_images), judge.predict_proba(pt), judge.predict_proba(pil)
    assert p_np.shape == (3, 10) and torch.allclose(p_np.sum(-1), torch.ones(3))
    # probabilities (in [0, 1]) of the same floats by two input paths: rounding only; PIL quantises to 8 bits (1/255)
    assert torch.allclose(p_np, p_pt, atol=1e-5) and torch.allclose(p_np, p_pil, atol=2e-2)
    assert judge.predict(torch.nn.functional.interpolate(pt, size=64)).shape == (3,)  # other sizes are resized


def test_judge_rejects_bad_input(judge):
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        judge.predict(torch.rand(32, 32, 3))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        judge.predict(np.random.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        judge.predict(torch.rand(2, 3, 32, 32) * 2 - 1)
    with pytest.raises(TypeError):
        judge.predict("image.png")


def test_judge_save_load_roundtrip(judge, tmp_path):
    judge.save_pretrained(str(tmp_path / "j"))
    assert json.load(open(tmp_path / "j" / "config.json"))["model_type"] == "digit-judge"
    again = DigitJudge.from_pretrained(str(tmp_path / "j"))
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(judge.predict_proba(x), again.predict_proba(x))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        DigitJudge.from_pretrained(str(tmp_path / "missing"))


def test_recommended_sampling_settings():
    assert DIGIT_SAMPLING["height"] == DIGIT_SAMPLING["width"] == 32
    assert DIGIT_SAMPLING["num_inference_steps"] <= 25 and DIGIT_SAMPLING["guidance_scale"] > 1


@pytest.mark.slow
def test_training_script_smoke(tmp_path, data_dir, monkeypatch):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "train_digit_world.py")
    spec = importlib.util.spec_from_file_location("train_digit_world", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_digit_world", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    metrics = mod.main(["--output_dir", str(tmp_path), "--mnist_dir", os.path.join(data_dir, "mnist"),
                        "--max_images", "600", "--judge_train_size", "500", "--judge_epochs", "1",
                        "--vae_epochs", "1", "--unet_steps", "3", "--eval_n_per_digit", "1"])
    assert os.path.isfile(tmp_path / "digit-sd" / "model_index.json")
    assert os.path.isfile(tmp_path / "digit-judge" / "model.safetensors")
    assert os.path.isfile(tmp_path / "digit-sd" / "tokenizer" / "vocab.json")
    assert metrics["generation"]["n_per_digit"] == 1
    assert json.load(open(tmp_path / "digit-world-metrics.json"))["judge"]["n_heldout"] == 100
