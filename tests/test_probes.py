"""Knowledge probes (``salun_diffusers.attacks.probes``, the ``salun-probe`` command) on the bundled digit world, and
the SD path on the tiny config-built pipeline. CPU; seconds each."""

import os

import numpy as np
import pytest
import torch

from PIL import Image

from salun_diffusers.attacks import cli as attack_cli
from salun_diffusers.attacks.probes import (
    ProbeSettings, conditioning_probe, ddim_sample, digit_images, image_latents, inpainting_probe, latent_images,
    region_mask, relearning_probe, run_probes, sdedit_probe)
from salun_diffusers.digits import load_digit_pipeline
from salun_diffusers.evaluation.judges import Verdict, make_judge


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_digit_pipeline(), make_judge("digit", digit=7), digit_images(7, 8)


def test_repaint_keeps_the_known_region_exactly(world):
    pipe, _, images = world
    latents = image_latents(pipe, images[:2])
    out = ddim_sample(pipe, torch.zeros(1, 77, pipe.text_encoder.config.hidden_size), [0, 1], steps=3, known=latents,
                 known_mask=torch.ones(1, 1, *latents.shape[-2:]))
    assert torch.allclose(out, latent_images(pipe, latents), atol=1e-5)  # everything known: the image itself


def test_region_mask_sides():
    m = region_mask((32, 32), "top", 0.5)
    assert m[..., :16, :].all() and not m[..., 16:, :].any()
    assert region_mask((32, 32), "left", 0.25)[..., :, :8].all()
    with pytest.raises(ValueError, match="keep"):
        region_mask((32, 32), "middle")


def test_probes_bring_the_digit_back_on_the_base(world):
    pipe, judge, images = world
    # the top half of a seven alone is mostly a seven already: the completion is read beside it
    ctx = inpainting_probe(pipe, judge, images, prompts=["a handwritten digit"], steps=10)
    assert ctx["kept_alone"] >= 0.5 and ctx["prompts"]["a handwritten digit"] >= 0.5
    # a little noise on a real seven: the base denoises it back into a seven with a neutral prompt
    assert sdedit_probe(pipe, judge, images, strengths=[0.3], steps=10)["strengths"]["0.3"] >= 0.75
    # from the neutral prompt (rarely a seven) the conditioning attack draws the seven more often
    att = conditioning_probe(pipe, judge, images, prompt="a handwritten digit", steps=30, sample_steps=10)
    assert att["asr"] >= att["before"] + 0.25


def test_relearning_leaves_the_pipeline_alone_and_counts_step_zero(world):
    pipe, judge, images = world
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    res = relearning_probe(pipe, judge, images[:4], prompt="a handwritten digit seven", seeds=[0], max_steps=2,
                           check_every=1, n_judged=8, sample_steps=10, lr=1e-3)
    assert res["runs"][0]["steps_to_relearn"] == 0 and res["median_steps"] == 0  # the base draws sevens
    # the prompt of a one: step 0 draws no sevens; a short fine-tune on four real sevens makes it draw them
    res = relearning_probe(pipe, judge, images[:4], prompt="a handwritten digit one", seeds=[0], max_steps=3,
                           check_every=1, n_judged=8, sample_steps=10, lr=1e-3)
    curve = res["runs"][0]["curve"]
    assert curve["0"] < 0.5 and res["runs"][0]["steps_to_relearn"] in (1, 2, 3)
    # too small a step: the runs go to max_steps and report no relearning
    res = relearning_probe(pipe, judge, images[:4], prompt="a handwritten digit one", seeds=[0], max_steps=2,
                           check_every=1, n_judged=8, sample_steps=10, lr=1e-9)
    assert list(res["runs"][0]["curve"]) == ["0", "1", "2"] and res["median_steps"] is None
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_run_probes_resumes_and_refuses_other_settings(world, tmp_path):
    pipe, judge, images = world
    s = ProbeSettings(probes=["sdedit"], n_images=4, strengths=[0.5], sample_steps=5)
    first = run_probes(s, pipe, judge, images, str(tmp_path), label="base")
    part = tmp_path / "parts" / "sdedit.json"
    stamp = os.path.getmtime(part)
    assert run_probes(s, pipe, judge, images, str(tmp_path), label="base")["probes"] == first["probes"]
    assert os.path.getmtime(part) == stamp  # reused, not recomputed
    for name in ("results.json", "report.md", "probes.png", "sdedit.png"):
        assert (tmp_path / name).is_file(), name
    with pytest.raises(ValueError, match="strengths"):
        run_probes(ProbeSettings(probes=["sdedit"], n_images=4, strengths=[0.7], sample_steps=5), pipe, judge,
                   images, str(tmp_path))


def test_the_sd_path_runs_the_same_probes_on_user_images(dummy_pipeline_dir, tmp_path, monkeypatch, capsys):
    """Mechanical: a tiny config-built SD pipeline, a folder of 'user' images, a stand-in judge (the SD path uses
    NudeNet); every probe runs and reports through the CLI."""
    folder = tmp_path / "user-images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(folder / f"{i}.png")

    class BrightJudge:  # a hit when the image is brighter than mid-grey
        def __call__(self, images):
            return [Verdict(float(np.asarray(im).mean()) > 127, "") for im in images]

    monkeypatch.setattr("salun_diffusers.attacks.probes.make_judge", lambda name, **kw: BrightJudge())
    out = tmp_path / "probes"
    rc = attack_cli.probe_main(["--model", dummy_pipeline_dir, "--images", str(folder), "--judge", "nudenet",
                      "--concept_prompt", "nudity", "--neutral_prompts", "a photo of a person", "",
                      "--n_images", "4", "--relearn_images", "2", "--relearn_seeds", "0", "--relearn_steps", "1",
                      "--relearn_every", "1", "--relearn_judged", "2", "--attack_steps", "1", "--strengths", "0.5",
                      "--sample_steps", "2", "--output_dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for probe in ("inpainting", "SDEdit", "relearning", "conditioning"):
        assert probe in printed, probe
    assert (out / "results.json").is_file() and (out / "probes.png").is_file()
    assert attack_cli.probe_main(["--model", dummy_pipeline_dir, "--output_dir", str(out)]) == 2  # no --digit/--images
    assert "--digit" in capsys.readouterr().err
