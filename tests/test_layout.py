"""Issue 11: the design card's top-level layout (setup.py, pipelines/, evaluation/), thin over the package."""

import json
import os
import runpy
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("nudity_i2p.py", "objects_classifier.py", "fid_clip_coco.py", "digit_world.py")


def _run_script(name, args, monkeypatch) -> int:
    """Run ``evaluation/<name>`` as ``python evaluation/<name> args`` would, in this process."""
    monkeypatch.setattr(sys, "argv", [f"evaluation/{name}", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "evaluation", name), run_name="__main__")
    return exit_info.value.code


def test_install_layout_ships_only_the_package():
    """pyproject.toml drives the install (setup.py only calls setup()); the top-level pipelines/ and evaluation/
    folders are scripts, never installed as packages named 'pipelines' or 'evaluation'."""
    import tomllib

    from setuptools import find_packages

    assert open(os.path.join(ROOT, "setup.py")).read().count("setup()") == 1
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(ROOT, include=find["include"])
    assert "salun_diffusers" in packages and "salun_diffusers.evaluation" in packages
    assert not [p for p in packages if p.split(".")[0] in ("pipelines", "evaluation", "tests", "benchmarks")]
    for folder in ("pipelines", "evaluation"):
        assert not os.path.exists(os.path.join(ROOT, folder, "__init__.py"))


def test_community_pipeline_file_loads_with_custom_pipeline(erase_config, tmp_path, dummy_pipeline_dir):
    from diffusers import DiffusionPipeline

    result = __import__("salun_diffusers.erase", fromlist=["erase"]).erase(
        erase_config(output_dir=str(tmp_path / "out"), save_pipeline="none"))
    pipe = DiffusionPipeline.from_pretrained(
        dummy_pipeline_dir, custom_pipeline=os.path.join(ROOT, "pipelines", "pipeline_stable_diffusion_erased.py"),
        trust_remote_code=True)
    assert type(pipe).__name__ == "StableDiffusionErasedPipeline"
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_erasure(result.output_dir)
    erased = dict(result.unet.named_parameters())
    assert all(torch.equal(p.detach(), erased[n].detach()) for n, p in pipe.unet.named_parameters())
    pipe.unload_erasure()
    assert all(torch.equal(p.detach(), base[n]) for n, p in pipe.unet.named_parameters())


@pytest.mark.parametrize("name", SCRIPTS)
def test_evaluation_scripts_print_help(name, monkeypatch, capsys):
    assert _run_script(name, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"usage: evaluation/{name}" in out and "Defaults: --judge" in out


def test_digit_world_script_tiny_run(tmp_path, monkeypatch):
    out = str(tmp_path / "audit")
    assert _run_script("digit_world.py", ["--output_dir", out, "--limit", "2", "--num_inference_steps", "2"],
                       monkeypatch) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["config"]["judge"] == "digit" and results["num_images"] == 2
    assert results["classes"]["num_retain"] == 2


def test_paper_protocol_scripts_tiny_runs(data_dir, tmp_path, monkeypatch, dummy_pipeline_dir):
    """SD path, mechanical: each protocol's defaults (I2P + NudeNet; Imagenette + a classifier; COCO + CLIP) run on
    the tiny pipeline, with tiny stand-ins for the judge / CLIP models the defaults would download."""
    from test_evaluation import _tiny_clip
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    pytest.importorskip("nudenet")
    common = ["--pretrained_model_name_or_path", dummy_pipeline_dir, "--limit", "2", "--num_inference_steps", "1"]
    out = str(tmp_path / "nudity")
    assert _run_script("nudity_i2p.py", [*common, "--output_dir", out], monkeypatch) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["nudity"]["num_images"] == 2 and results["config"]["prompts"].endswith("i2p_prompts.csv")

    judge_dir = str(tmp_path / "judge")
    names = ["tench, Tinca tinca", "English springer", "cassette player", "chain saw, chainsaw",
             "church, church building", "French horn", "garbage truck, dustcart", "gas pump", "golf ball", "parachute"]
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1],
                                              id2label=dict(enumerate(names)))).save_pretrained(judge_dir)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(judge_dir)
    out = str(tmp_path / "objects")
    assert _run_script("objects_classifier.py", [*common, "--output_dir", out, "--judge_model", judge_dir,
                                                 "--target_class", "church"], monkeypatch) == 0
    cls = json.load(open(os.path.join(out, "results.json")))["classes"]
    assert cls["target_class"] == 4 and cls["num_forget"] + cls["num_retain"] == 2

    model, processor = _tiny_clip(tmp_path)
    model.save_pretrained(str(tmp_path / "clip"))
    processor.save_pretrained(str(tmp_path / "clip"))
    out = str(tmp_path / "coco")
    assert _run_script("fid_clip_coco.py", [*common, "--output_dir", out, "--clip_model", str(tmp_path / "clip")],
                       monkeypatch) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert 0 <= results["clip_score"] <= 100 and results["config"]["prompts"].endswith("coco_10k.csv")
