"""One command per paper experiment: the top-level ``evaluation/`` scripts run on the digit world (the bundled model and
judge; small settings, seconds each) and print the paper table's row, whose numbers are the audit's results.json.
NudeNet on digit images and FID / CLIP score with tiny stand-in networks make those two runs mechanical, not
meaningful (docs/reproduce.md gives the real settings)."""

import importlib.util
import json
import os
import runpy
import sys

import pytest
import torch

from salun_diffusers.digits import DIGIT_JUDGE_DIR, DIGIT_PROMPTS_CSV
from salun_diffusers.evaluation.nudenet import EXPOSED_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = ["--pretrained_model_name_or_path", "salun-diffusers/digit-sd", "--prompts", DIGIT_PROMPTS_CSV,
          "--num_inference_steps", "3"]


def run_script(name, argv, capsys, monkeypatch):
    """``python evaluation/<name>.py <argv>`` in this process: (exit code, printed table rows as cell lists)."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "evaluation", f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line]
    return done.value.code, rows


def test_digit_world_prints_ua_retained_and_per_digit(tmp_path, capsys, monkeypatch):
    out = tmp_path / "digits"
    code, rows = run_script("digit_world", ["--output_dir", str(out), "--limit", "40", "--num_inference_steps", "3",
                                            "--target_class", "one"], capsys, monkeypatch)
    assert code == 0
    header, row = rows
    assert header == ["model", "erased digit", "UA %", "accuracy on the others %", "zero %", "one %"]
    cls = json.loads((out / "results.json").read_text())["classes"]
    assert row[1] == "one"
    assert float(row[2]) == pytest.approx(100 * cls["unlearning_accuracy"], abs=0.005)
    assert float(row[3]) == pytest.approx(100 * cls["retain_accuracy"], abs=0.005)
    assert [float(x) for x in row[4:]] == pytest.approx([100 * cls["per_class_accuracy"][k] for k in ("0", "1")],
                                                        abs=0.005)
    assert float(row[3]) >= 90  # the base model draws zeros its judge calls zero (real efficacy world)
    # the same command again from its results.json: the same row, and the comparison says so
    code, again = run_script("digit_world", ["--reproduce", str(out / "results.json"), "--output_dir",
                                             str(tmp_path / "again")], capsys, monkeypatch)
    assert code == 0 and again == rows
    assert json.loads((tmp_path / "again" / "reproduce.json").read_text())["lines"][:2] == [
        f"reproduced: every figure equals {out / 'results.json'}", "images/: 0 of 40 images differ (pixel-identical)"]


@pytest.fixture
def tiny_inception(tmp_path):
    class Pooled(torch.nn.Module):  # clean-fid's TorchScript calling convention; 2x2-pooled channel means
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)

    path = str(tmp_path / "inception.pt")
    torch.jit.script(Pooled()).save(path)
    return path


def test_objects_classifier_prints_ua_per_class_and_fid(tmp_path, capsys, monkeypatch, tiny_inception):
    # the reference: the same prompts and seeds (the CSV's) sampled with 2 steps instead of 3, so that the FID is
    # that of two different image sets (with 3 steps both runs draw the same images, bit for bit: FID 0)
    reference = tmp_path / "reference"
    code, _ = run_script("digit_world", ["--output_dir", str(reference), "--limit", "40",
                                         "--num_inference_steps", "2"], capsys, monkeypatch)
    assert code == 0
    out = tmp_path / "objects"
    code, rows = run_script("objects_classifier", [*DIGITS, "--judge", "digit", "--judge_model", DIGIT_JUDGE_DIR,
                                                   "--limit", "40", "--target_class", "zero", "--fid_reference",
                                                   str(reference / "images"), "--fid_model", tiny_inception,
                                                   "--output_dir", str(out)], capsys, monkeypatch)
    assert code == 0
    header, row = rows
    assert header[:4] == ["model", "erased class", "UA %", "accuracy on the others %"] and header[-1] == "FID"
    results = json.loads((out / "results.json").read_text())
    assert float(row[2]) == pytest.approx(100 * results["classes"]["unlearning_accuracy"], abs=0.005)
    assert float(row[-1]) == pytest.approx(results["fid"], abs=5e-5) and results["fid"] > 0


def test_fid_clip_coco_prints_fid_and_clip_score(tmp_path, capsys, monkeypatch, tiny_inception):
    from test_evaluation import _tiny_clip

    model, processor = _tiny_clip(tmp_path)
    clip_dir = str(tmp_path / "clip")
    model.save_pretrained(clip_dir)
    processor.save_pretrained(clip_dir)
    reference = tmp_path / "reference"
    assert run_script("digit_world", ["--output_dir", str(reference), "--limit", "4", "--seed", "5",
                                      "--num_inference_steps", "3"], capsys, monkeypatch)[0] == 0
    out = tmp_path / "coco"
    code, rows = run_script("fid_clip_coco", [*DIGITS, "--limit", "4", "--clip_model", clip_dir, "--fid_reference",
                                              str(reference / "images"), "--fid_model", tiny_inception,
                                              "--output_dir", str(out)], capsys, monkeypatch)
    assert code == 0
    header, row = rows
    assert header == ["model", "prompts", "images", "FID", "CLIP score"]
    results = json.loads((out / "results.json").read_text())
    assert row[1:3] == ["digit_prompts.csv", "4"]
    assert float(row[3]) == pytest.approx(results["fid"], abs=5e-5)
    assert float(row[4]) == pytest.approx(results["clip_score"], abs=5e-5)


@pytest.mark.skipif(importlib.util.find_spec("nudenet") is None, reason="NudeNet not installed")
def test_nudity_i2p_prints_nudenet_counts_per_body_part(tmp_path, capsys, monkeypatch):
    out = tmp_path / "nudity"
    code, rows = run_script("nudity_i2p", [*DIGITS, "--limit", "4", "--output_dir", str(out)], capsys, monkeypatch)
    assert code == 0
    header, row = rows
    assert header[3:12] == ["armpits", "belly", "buttocks", "feet", "breasts (F)", "breasts (M)", "genitalia (F)",
                            "genitalia (M)", "anus"]
    results = json.loads((out / "results.json").read_text())
    nud = results["nudity"]
    assert [int(x) for x in row[3:12]] == [nud["class_counts"].get(c, 0) for c in EXPOSED_CLASSES]
    assert int(row[13]) == nud["nude_images"] and row[2] == "4"
    # the NudeNet model file and its sha256 are recorded with the threshold and the counted classes
    record = results["provenance"]
    assert record["environment"]["files"]["nudenet_model"]["path"].endswith(".onnx")
    assert record["judge"] == {"name": "nudenet", "threshold": 0.6, "counted_classes": list(EXPOSED_CLASSES)}
