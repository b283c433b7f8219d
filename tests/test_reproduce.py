"""Every number reproducible: salun-audit's and salun-attack's results.json record what their figures depend on
(versions, file hashes, judge settings, seeds), and ``--reproduce results.json`` reruns the recorded run and says
where the result and the recorded settings differ (digit world for the audit, tiny pipeline for the attack; CPU,
seconds)."""

import json
import os

import pytest

from salun_diffusers import provenance
from salun_diffusers.attacks import cli as attack_cli
from salun_diffusers.evaluation import cli as audit_cli
from salun_diffusers.evaluation.reproduce import model_files_record, nudenet_model_file, reproduce_output_dir

AUDIT = ["--judge", "digit", "--limit", "4", "--num_inference_steps", "3"]


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "base"
    assert audit_cli.main([*AUDIT, "--output_dir", str(out)]) == 0
    return out


def test_audit_results_record_versions_files_judge_and_rows(audit_run):
    results = json.loads((audit_run / "results.json").read_text())
    record = results["provenance"]
    env = record["environment"]
    assert env["torch"] == provenance.package_version("torch")
    assert env["diffusers"] == provenance.package_version("diffusers")
    prompts = results["config"]["prompts"]
    assert env["files"]["prompts"]["sha256"] == provenance.file_sha256(prompts)
    unet = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    assert record["models"]["model"]["files"][unet] == provenance.file_sha256(
        os.path.join(os.path.dirname(audit_cli.__file__), "..", "assets", "digit-sd", unet))
    assert record["judge"]["name"] == "digit" and record["judge"]["model"]["files"]
    assert record["rows"]["count"] == 4 and len(record["rows"]["seeds"]) == 4 and record["rows"]["sizes"] == ["32x32"]
    assert record["safety_checker"].startswith("off")
    assert results["config"]["num_inference_steps"] == 3 and results["settings"]["mixed_precision"] == "no"


def test_audit_reproduce_agrees_then_names_what_differs(audit_run, tmp_path, capsys):
    again = tmp_path / "again"
    assert audit_cli.main(["--reproduce", str(audit_run / "results.json"), "--output_dir", str(again)]) == 0
    printed = capsys.readouterr().out
    assert "reproduced: every figure equals" in printed and "images/: 0 of 4 images differ" in printed
    assert "no recorded setting differs" in printed
    assert json.loads((again / "reproduce.json").read_text())["equal"] is True
    # a record from "another machine": other torch version and another figure; the rerun says both, exits 1
    tampered = json.loads((audit_run / "results.json").read_text())
    tampered["provenance"]["environment"]["torch"] = "1.0.0"
    tampered["classes"]["retain_accuracy"] = 0.5
    other = tmp_path / "other-machine"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(tampered))
    assert audit_cli.main(["--reproduce", str(other / "results.json")]) == 1
    printed = capsys.readouterr().out
    assert "classes.retain_accuracy: 0.5 -> 1.0" in printed
    assert f"environment.torch: 1.0.0 -> {provenance.package_version('torch')}" in printed
    assert os.path.isfile(str(other) + "-reproduce/results.json")  # the default output folder
    # refusals: a finished folder, a results.json without a config
    assert audit_cli.main(["--reproduce", str(audit_run / "results.json"), "--output_dir", str(again)]) == 2
    (other / "results.json").write_text(json.dumps({"nudity": None}))
    assert audit_cli.main(["--reproduce", str(other / "results.json")]) == 2
    assert "records no config" in capsys.readouterr().err


def test_attack_results_record_provenance_and_reproduce(dummy_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "attack"
    args = ["--model", dummy_pipeline_dir, "--output_dir", str(out), "--judge", "digit", "--digit", "7", "--steps",
            "2", "--num_tokens", "2", "--num_inference_steps", "2", "--num_prompts", "2", "--attack", "conditioning"]
    assert attack_cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    record = results["provenance"]
    assert record["models"]["model"]["files"] and record["judge"] == {"name": "digit", "model": record["judge"]["model"],
                                                                      "digit": 7}
    assert record["rows"]["seeds"] == [0, 1] and results["config"]["attack"] == "conditioning"
    capsys.readouterr()
    assert attack_cli.main(["--reproduce", str(out / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "reproduced: every figure equals" in printed
    for kind in ("targets", "before", "after"):
        assert f"{kind}/: 0 of 2 images differ" in printed


def test_record_helpers(tmp_path):
    assert nudenet_model_file("custom.onnx") == "custom.onnx"
    found = nudenet_model_file()
    assert found is None or (found.endswith(".onnx") and os.path.isfile(found))
    assert model_files_record("owner/not-cached-anywhere") == {"id": "owner/not-cached-anywhere", "files": None}
    (tmp_path / "run").mkdir()
    assert reproduce_output_dir(str(tmp_path / "run" / "results.json"), None) == str(tmp_path / "run") + "-reproduce"
    (tmp_path / "run-reproduce").mkdir()
    assert reproduce_output_dir(str(tmp_path / "run" / "results.json"), None) == str(tmp_path / "run") + "-reproduce-2"
