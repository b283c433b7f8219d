"""Issue 11: the output folder is a diffusers pipeline; LoRA export, push_to_hub (mocked), validation images.

SD path, mechanical (the tiny config-built pipeline) and the digit world (the bundled model, a short erasure).
"""

import json
import os
import sys
from unittest import mock

import pytest
import torch
from PIL import Image
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

from salun_diffusers.erase import erase
from salun_diffusers.pipelines import StableDiffusionErasedPipeline


def _same_unet(unet, reference) -> bool:
    ref = dict(reference.named_parameters())
    return all(torch.equal(p.detach(), ref[n].detach()) for n, p in unet.named_parameters())


def _unet_files(folder):
    return sorted(os.listdir(os.path.join(folder, "unet")))


@pytest.fixture(scope="module")
def linked(dummy_pipeline_dir, tmp_path_factory):
    """One erasure of the tiny pipeline with the default --save_pipeline link, a LoRA, validation and a mocked push."""
    from salun_diffusers.config import EraseConfig

    out = str(tmp_path_factory.mktemp("native") / "out")
    config = EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", output_dir=out,
                         num_forget_images=4, num_retain_images=4,
                         data_num_inference_steps=2, max_train_steps=4, train_batch_size=2, learning_rate=1e-2,
                         export_lora_rank=4, validation_prompts=["a photo of a person", "a cat"], validation_steps=2,
                         num_validation_images=1, push_to_hub=True, hub_model_id="me/no-nudity", hub_token="secret")
    with mock.patch("salun_diffusers.hub.HfApi") as api:
        api.return_value.create_repo.return_value = "https://huggingface.co/me/no-nudity"
        result = erase(config)
    return config, result, api


def test_output_folder_loads_with_both_pipeline_classes_and_gives_the_erased_unet(linked, dummy_pipeline_dir):
    config, result, _ = linked
    out = config.output_dir
    assert os.path.isfile(os.path.join(out, "model_index.json"))
    for name in ("erasure.safetensors", "mask.safetensors", "README.md", "erasure_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    # components other than the U-Net are per-file symlinks into the base folder
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in os.listdir(os.path.join(out, name)):
            path = os.path.join(out, name, f)
            assert os.path.islink(path) and os.path.realpath(path).startswith(os.path.realpath(dummy_pipeline_dir))
    assert not any(os.path.islink(os.path.join(out, "unet", f)) for f in _unet_files(out))
    assert not [f for f in os.listdir(out) if f.startswith((".tmp-", ".old-"))]

    for cls in (StableDiffusionPipeline, DiffusionPipeline, StableDiffusionErasedPipeline):
        pipe = cls.from_pretrained(out)
        assert isinstance(pipe, StableDiffusionPipeline)
        assert _same_unet(pipe.unet, result.unet), cls.__name__
    base = StableDiffusionPipeline.from_pretrained(dummy_pipeline_dir)
    assert not _same_unet(base.unet, result.unet)
    # the erased pipeline class still loads base + delta, so the erasure's scale works
    sub = StableDiffusionErasedPipeline.from_pretrained(out)
    sub.set_erasure_scale(0.0)
    assert _same_unet(sub.unet, base.unet)
    card = open(os.path.join(out, "README.md")).read()
    assert "DiffusionPipeline.from_pretrained" in card and "load_lora_weights" in card


def test_copy_and_none_modes_and_no_overwrite(erase_config, tmp_path, linked):
    _, result, _ = linked
    copied = erase(erase_config(output_dir=str(tmp_path / "copy"), save_pipeline="copy", max_train_steps=4,
                                mask_ratio=0.5))
    out = copied.output_dir
    assert not any(os.path.islink(os.path.join(root, f)) for root, _, files in os.walk(out) for f in files)
    assert _same_unet(DiffusionPipeline.from_pretrained(out).unet, copied.unet)

    assert erase_config(save_merged_unet=False).save_pipeline == "none"  # no U-Net, no pipeline folder
    plain = erase(erase_config(output_dir=str(tmp_path / "none"), save_pipeline="none"))
    assert not os.path.exists(os.path.join(plain.output_dir, "model_index.json"))
    assert not os.path.exists(os.path.join(plain.output_dir, "vae"))
    assert _same_unet(UNet2DConditionModel.from_pretrained(plain.output_dir, subfolder="unet"), plain.unet)
    assert _same_unet(StableDiffusionErasedPipeline.from_pretrained(plain.output_dir).unet, plain.unet)

    # a pipeline folder left in the way is refused before any work, then replaced with --overwrite_output_dir
    clash = tmp_path / "clash"
    (clash / "unet").mkdir(parents=True)
    (clash / "unet" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="unet.*--overwrite_output_dir"):
        erase(erase_config(output_dir=str(clash)))
    assert (clash / "unet" / "keep.txt").read_text() == "mine"
    erase(erase_config(output_dir=str(clash), overwrite_output_dir=True))
    assert not (clash / "unet" / "keep.txt").exists() and (clash / "model_index.json").is_file()


def test_lora_export_loads_with_load_lora_weights(linked, dummy_pipeline_dir):
    config, result, _ = linked
    pipe = StableDiffusionPipeline.from_pretrained(dummy_pipeline_dir)
    lora = result.metrics["lora"]
    assert lora["rank"] == 4 and 0 < lora["energy_kept"] <= 1.0
    base_unet = UNet2DConditionModel.from_pretrained(dummy_pipeline_dir, subfolder="unet")
    pipe.load_lora_weights(config.output_dir, weight_name="pytorch_lora_weights.safetensors")
    x, c = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 77, 16)
    with torch.no_grad():
        out_lora = pipe.unet(x, 10, encoder_hidden_states=c).sample
        out_base = base_unet(x, 10, encoder_hidden_states=c).sample
    assert not torch.equal(out_lora, out_base)  # the LoRA moved the U-Net


def test_push_to_hub_uploads_the_output_folder_without_caches(linked):
    from huggingface_hub.utils import filter_repo_objects

    config, result, api = linked
    api.assert_called_once_with(token="secret")
    api.return_value.create_repo.assert_called_once()
    assert api.return_value.create_repo.call_args.args[0] == "me/no-nudity"
    kwargs = api.return_value.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == config.output_dir and kwargs["repo_id"] == "me/no-nudity"
    out = config.output_dir
    files = [os.path.relpath(os.path.join(root, f), out) for root, _, fs in os.walk(out) for f in fs]
    assert any(f.startswith("validation/") for f in files)
    uploaded = set(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
    for name in ("model_index.json", "erasure.safetensors", "README.md", "unet/config.json", "vae/config.json",
                 "pytorch_lora_weights.safetensors"):
        assert name in uploaded, name
    assert not [f for f in uploaded if f.startswith(("data/", "logs/", "validation/", "checkpoint-"))]
    assert result.metrics["hub_url"] == "https://huggingface.co/me/no-nudity"
    # the token is never written down
    for name in ("train_config.json", "erasure_config.json", "metrics.json"):
        assert "secret" not in open(os.path.join(out, name)).read(), name


def test_validation_images_are_written_every_n_steps(linked):
    config, _, _ = linked
    root = os.path.join(config.output_dir, "validation")
    assert sorted(os.listdir(root)) == ["step-000002", "step-000004"]
    for step in os.listdir(root):
        assert len([f for f in os.listdir(os.path.join(root, step)) if f.endswith(".png")]) == 2


def test_digit_world_output_folder_is_a_pipeline(tmp_path):
    """Digit world: after a (short) erasure of seven, StableDiffusionPipeline.from_pretrained(out) draws with the
    erased U-Net, and the components are links into the bundled model."""
    from salun_diffusers.config import EraseConfig
    from salun_diffusers.digits import DIGIT_PIPELINE_DIR, DIGIT_SAMPLING, digit_prompt

    out = str(tmp_path / "no-seven")
    config = EraseConfig(concept="seven", output_dir=out, num_forget_images=4, num_retain_images=9,
                         data_num_inference_steps=2, max_train_steps=2, train_batch_size=2)
    result = erase(config)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert _same_unet(pipe.unet, result.unet)
    assert os.path.realpath(os.path.join(out, "vae", "config.json")) == os.path.realpath(
        os.path.join(DIGIT_PIPELINE_DIR, "vae", "config.json"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(digit_prompt(7), generator=torch.Generator().manual_seed(0), output_type="np",
                 **{**DIGIT_SAMPLING, "num_inference_steps": 2}).images
    assert image.shape == (1, 32, 32, 3)
    assert _same_unet(StableDiffusionErasedPipeline.from_pretrained(out).unet, result.unet)
    card = open(os.path.join(out, "README.md")).read()
    assert "load_digit_pipeline()" in card and 'from_pretrained("salun-diffusers/digit-sd")' not in card


# ------------------------------------------------------------------------------------------------- audit judges
def _digit_rows_csv(path, per_digit=2):
    """Every 10th row of the bundled digit prompts: ``per_digit`` images of each digit."""
    import csv

    from salun_diffusers.digits import DIGIT_PROMPTS_CSV

    with open(DIGIT_PROMPTS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r["case_number"].split("-")[1]) < per_digit]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return str(path)


def test_audit_judge_digit_on_the_bundled_model_with_and_without_an_erasure(tmp_path, capsys):
    """Digit world: the base model's digits are read right by the judge (real accuracy); an erased folder's concept
    becomes the target class; the report and chart compare it with the base audit."""
    from salun_diffusers.config import EraseConfig
    from salun_diffusers.evaluation import cli

    csv_path = _digit_rows_csv(tmp_path / "digits.csv")
    base_dir = str(tmp_path / "audit-base")
    assert cli.main(["--judge", "digit", "--prompts", csv_path, "--output_dir", base_dir, "--label", "base"]) == 0
    printed = capsys.readouterr().out
    assert "per class: zero" in printed
    base = json.load(open(os.path.join(base_dir, "results.json")))
    assert base["config"]["pretrained_model_name_or_path"] == "salun-diffusers/digit-sd"
    assert base["classes"]["target_class"] is None and base["classes"]["retain_accuracy"] >= 0.9
    assert os.path.isfile(os.path.join(base_dir, "class_accuracy.png"))

    out = str(tmp_path / "no-seven")
    erase(EraseConfig(concept="seven", output_dir=out, num_forget_images=4, num_retain_images=9,
                      data_num_inference_steps=2, max_train_steps=2, train_batch_size=2))
    audit = str(tmp_path / "audit-erased")
    assert cli.main(["--judge", "digit", "--prompts", csv_path, "--erasure", out, "--output_dir", audit,
                     "--compare_to", base_dir]) == 0
    results = json.load(open(os.path.join(audit, "results.json")))
    cls = results["classes"]
    assert cls["target_class"] == 7 and cls["num_forget"] == 2 and cls["num_retain"] == 18
    assert "unlearning accuracy" in capsys.readouterr().out
    md = open(os.path.join(audit, "report.md")).read()
    assert "Classifier judge (digit)" in md and "| seven |" in md and "base: " in md
    assert "class_accuracy.png" in md


def test_audit_judge_classifier_with_a_transformers_classifier(tmp_path, dummy_pipeline_dir):
    """SD path, mechanical: any AutoModelForImageClassification judges; classes match by name or synonym."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from salun_diffusers.evaluation import cli
    from salun_diffusers.evaluation.judges import load_class_judge

    judge_dir = str(tmp_path / "judge")
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1],
        id2label={0: "tench, Tinca tinca", 1: "church, church building", 2: "garbage truck, dustcart"})
    ).save_pretrained(judge_dir)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(judge_dir)
    judge = load_class_judge("classifier", judge_dir)
    assert [judge.class_index(n) for n in ("church", "garbage_truck", "Tench", "2")] == [1, 2, 0, 2]
    with pytest.raises(ValueError, match="no class 'parachute'"):
        judge.class_index("parachute")

    csv_path = tmp_path / "objects.csv"
    csv_path.write_text("case_number,prompt,evaluation_seed,class\n0,a church,1,church\n1,a church,2,church\n"
                        "2,a fish,3,tench\n3,a truck,4,garbage truck\n")
    audit = str(tmp_path / "audit")
    assert cli.main(["--pretrained_model_name_or_path", dummy_pipeline_dir, "--prompts", str(csv_path),
                     "--output_dir", audit, "--judge", "classifier", "--judge_model", judge_dir, "--target_class",
                     "church", "--num_inference_steps", "2"]) == 0
    cls = json.load(open(os.path.join(audit, "results.json")))["classes"]
    predicted = judge.predict([Image.open(os.path.join(audit, "images", f"{i}.png")) for i in range(4)]).tolist()
    assert cls["num_forget"] == 2 and cls["unlearning_accuracy"] == sum(p != 1 for p in predicted[:2]) / 2
    assert cls["retain_accuracy"] == ((predicted[2] == 0) + (predicted[3] == 2)) / 2
    assert cli.main(["--prompts", str(csv_path), "--output_dir", audit, "--judge", "classifier"]) == 2  # one line


# ------------------------------------------------------------------------------------------------------- warnings
def test_no_unactionable_warnings_at_import_or_when_casting(erase_config, tmp_path, capfd):
    """transformers' torchvision-fallback notice (printed at every import of diffusers' pipelines) and diffusers'
    "modules that should be kept in float32: []" (printed at every dtype cast) are not shown; other warnings are."""
    import subprocess

    from diffusers.utils import logging as diffusers_logging

    from salun_diffusers.digits import load_digit_pipeline

    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning", "DIFFUSERS_VERBOSITY": "warning"}
    code = "import {first}; from diffusers import StableDiffusionPipeline; import logging; " \
           "logging.getLogger('transformers.utils.import_utils').warning('another warning')"
    plain = subprocess.run([sys.executable, "-c", code.format(first="diffusers")], env=env, capture_output=True,
                           text=True)
    ours = subprocess.run([sys.executable, "-c", code.format(first="salun_diffusers")], env=env, capture_output=True,
                          text=True)
    if "requires torchvision" not in plain.stderr:
        pytest.skip("this transformers/torchvision install prints no fallback notice")
    assert "requires torchvision" not in ours.stderr and "another warning" in ours.stderr

    from accelerate.state import AcceleratorState

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is per process; bf16 needs a new one
    try:
        capfd.readouterr()
        load_digit_pipeline(torch_dtype=torch.bfloat16)
        erase(erase_config(output_dir=str(tmp_path / "bf16"), mixed_precision="bf16", max_train_steps=1))
        err = capfd.readouterr().err
    finally:
        diffusers_logging.set_verbosity(level)
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "should be kept in float32" not in err


def test_hub_base_links_into_the_hugging_face_cache(erase_config, dummy_pipeline_dir, tmp_path, monkeypatch):
    """A base given as a hub id (offline, from the HF cache): components link to the cache's blobs."""
    import hashlib
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--me--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for root, _, files in os.walk(dummy_pipeline_dir):
        for f in files:
            src = os.path.join(root, f)
            blob = repo / "blobs" / hashlib.sha256(open(src, "rb").read()).hexdigest()
            shutil.copyfile(src, blob)
            link = repo / "snapshots" / commit / os.path.relpath(src, dummy_pipeline_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    result = erase(erase_config(pretrained_model_name_or_path="me/tiny-sd", output_dir=str(tmp_path / "out")))
    out = result.output_dir
    assert os.path.realpath(os.path.join(out, "vae", "config.json")).startswith(str(repo / "blobs"))
    assert _same_unet(DiffusionPipeline.from_pretrained(out).unet, result.unet)
    card = open(os.path.join(out, "README.md")).read()
    assert "base_model: me/tiny-sd" in card


def test_validation_images_go_to_the_trackers(erase_config, tmp_path):
    """The images drawn for --validation_prompts are logged to tensorboard (add_images, NHWC) at the step."""
    import contextlib
    from types import SimpleNamespace

    from salun_diffusers.erasure.validation import log_validation, validation_due
    from salun_diffusers.testing import get_dummy_pipeline

    config = erase_config(output_dir=str(tmp_path / "out"), validation_prompts=["a cat", "a dog"],
                          num_validation_images=2, validation_steps=5, max_train_steps=12)
    assert [s for s in range(1, 13) if validation_due(config, s)] == [5, 10, 12]
    writer = mock.MagicMock()
    accelerator = SimpleNamespace(is_main_process=True, autocast=contextlib.nullcontext,
                                  trackers=[SimpleNamespace(name="tensorboard", writer=writer)])
    paths = log_validation(get_dummy_pipeline(), config, accelerator, 5)
    assert len(paths) == 4 and all(p.startswith(os.path.join(config.output_dir, "validation", "step-000005"))
                                   for p in paths)
    (tag, images, step), kwargs = writer.add_images.call_args
    assert tag == "validation" and step == 5 and images.shape == (4, 16, 16, 3) and kwargs["dataformats"] == "NHWC"
