"""environment_record and diff_records: what a figure depended on, and which recorded setting two runs differ in."""

import hashlib
import importlib.metadata
import json
import platform

import pytest
import torch

from salun_diffusers.provenance import PACKAGES, diff_records, environment_record, package_version


def test_environment_record_is_json_and_names_versions_threads_and_file_hashes(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na photo of a church,1\n")
    record = environment_record({"prompts": str(prompts), "nudenet_model": None})
    assert json.loads(json.dumps(record)) == record
    assert record["python"] == platform.python_version()
    assert record["torch"] == importlib.metadata.version("torch")
    assert record["diffusers"] == importlib.metadata.version("diffusers")
    assert set(PACKAGES) <= set(record)
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["files"]["prompts"]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert record["files"]["nudenet_model"] is None
    assert package_version("no-such-package-salun") is None
    with pytest.raises(FileNotFoundError, match="'judge'.*no file"):
        environment_record({"judge": str(tmp_path / "missing.onnx")})


def test_diff_records_names_each_setting_that_differs(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("a\n")
    old = environment_record({"prompts": str(prompts)})
    assert diff_records(old, json.loads(json.dumps(old))) == []  # a record agrees with its JSON round trip
    new = json.loads(json.dumps(old))
    new.update(torch="2.14.1", gpu=["NVIDIA H200"], torch_threads=old["torch_threads"] + 1)
    del new["cuda"]
    prompts.write_text("b\n")
    new["files"] = environment_record({"prompts": str(prompts)})["files"]
    new["guidance_scale"] = 7.5
    lines = diff_records(old, new)
    assert f"torch: {old['torch']} -> 2.14.1" in lines
    assert f"torch_threads: {old['torch_threads']} -> {old['torch_threads'] + 1}" in lines
    assert f"gpu: {old['gpu']} -> NVIDIA H200" in lines
    assert f"cuda: {old['cuda']} -> (not recorded)" in lines
    assert "guidance_scale: (not recorded) -> 7.5" in lines
    sha = [line for line in lines if line.startswith("files.prompts.sha256: ")]
    assert sha == [f"files.prompts.sha256: {old['files']['prompts']['sha256'][:12]}... -> "
                   f"{new['files']['prompts']['sha256'][:12]}..."]
    assert len(lines) == 6
    assert diff_records({"fp16": True}, {"fp16": 1}) == ["fp16: True -> 1"]
    assert diff_records({"steps": 50}, {"steps": 50.0}) == []
