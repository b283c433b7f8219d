"""Evaluation package: prompt CSVs, seeded/resumable/sharded generation, nudity audit, metrics, reports, CLI."""

import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from salun_diffusers.data import default_data_dir
from salun_diffusers.evaluation import audit, cli, report
from salun_diffusers.evaluation.generate import generate_images, image_path, missing_images
from salun_diffusers.evaluation.metrics import (ClipScorer, classifier_metrics, compute_fid, fid_from_features,
                                                load_inception)
from salun_diffusers.evaluation.nudenet import (EXPOSED_CLASSES, NudeNetDetector, detect_images, exposed_parts,
                                                nudity_summary)
from salun_diffusers.evaluation.prompts import read_prompts, shard_rows

DATA = default_data_dir()
PROMPTS = os.path.join(DATA, "prompts") if DATA else None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_file(*parts):
    path = os.path.join(DATA or "", *parts)
    if not DATA or not os.path.isfile(path):
        pytest.skip(f"shared data file {path} not available")
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ------------------------------------------------------------------------------------------------ prompt CSVs
def test_read_i2p_full_and_filters():
    path = data_file("i2p_prompts.csv")
    rows = read_prompts(path)
    assert len(rows) == 4703
    first = rows[0]
    assert (first.case_number, first.seed, first.guidance, first.width, first.height) == ("0", 4261553411, 13.0,
                                                                                          512, 512)
    assert first.categories == ("violence", "self-harm")
    empty = [r for r in rows if not r.prompt]
    assert [r.case_number for r in empty] == ["2260"]  # kept by default, as an unconditional image
    assert len(read_prompts(path, skip_empty=True)) == 4702
    sexual = read_prompts(path, categories=["sexual"])
    assert len(sexual) == 931 and all("sexual" in r.categories for r in sexual)
    assert [r.case_number for r in read_prompts(path, categories=["Sexual"], limit=3)] == [
        r.case_number for r in sexual[:3]]


def test_read_other_schemas():
    nud = read_prompts(data_file("prompts", "i2p_nudity_142.csv"))
    assert len(nud) == 142 and nud[0].case_number == "21" and nud[0].seed == 932309623
    coco = read_prompts(data_file("prompts", "coco_10k.csv"), limit=5)
    assert len(coco) == 5
    assert coco[0].case_number == "000000203564"  # kept verbatim: it names the file
    assert (coco[0].guidance, coco[0].width, coco[0].height, coco[0].categories) == (7.5, None, None, ())
    assert coco[0].seed == 41337
    coco30 = read_prompts(data_file("prompts", "coco_30k.csv"), limit=3)
    assert [r.case_number for r in coco30] == ["0", "1", "2"]  # no case_number column: row index
    nette = read_prompts(data_file("prompts", "imagenette.csv"))  # starts with a BOM
    assert len(nette) == 10 and nette[0].case_number == "0" and nette[0].label == "tench"
    assert nette[0].extra["classidx"] == "0"
    nette100 = read_prompts(data_file("prompts", "imagenette_100.csv"))
    assert len(nette100) == 100 and nette100[0].label == "cassette player" and "" not in nette100[0].extra
    church = read_prompts(data_file("prompts", "object_church.csv"))
    assert len(church) == 50 and church[0].guidance == 7.5 and church[0].prompt.startswith("Old stone church")


def test_a_seed_the_csv_overrides_is_said_not_silently_dropped(tmp_path, caplog):
    """--seed applies only to rows without evaluation_seed; where every row has one (the bundled digit prompts), the
    unused seed is said in a warning; where any row uses it, nothing is said."""
    seeded = write_csv(tmp_path / "s.csv", ["prompt", "evaluation_seed"], [["a cat", 3], ["a dog", 4]])
    with caplog.at_level(logging.WARNING, logger="salun_diffusers.evaluation.prompts"):
        assert [r.seed for r in read_prompts(seeded, default_seed=10)] == [3, 4]
    assert "--seed 10 is not used" in caplog.text
    caplog.clear()
    mixed = write_csv(tmp_path / "m.csv", ["prompt", "evaluation_seed"], [["a cat", 3], ["a dog", ""]])
    with caplog.at_level(logging.WARNING, logger="salun_diffusers.evaluation.prompts"):
        assert [r.seed for r in read_prompts(mixed, default_seed=10)] == [3, 11]
        assert [r.seed for r in read_prompts(seeded)] == [3, 4]
    assert "is not used" not in caplog.text


def test_bad_csvs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'prompt' column"):
        read_prompts(write_csv(tmp_path / "a.csv", ["text", "evaluation_seed"], [["x", 1]]))
    no_seed = write_csv(tmp_path / "b.csv", ["prompt"], [["a cat"], ["a dog"]])
    with pytest.raises(ValueError, match="evaluation_seed.*--seed"):
        read_prompts(no_seed)
    assert [r.seed for r in read_prompts(no_seed, default_seed=10)] == [10, 11]
    with pytest.raises(ValueError, match="case_number '1' repeats"):
        read_prompts(write_csv(tmp_path / "c.csv", ["case_number", "prompt", "evaluation_seed"],
                               [[1, "a", 1], [1, "b", 2]]))
    with pytest.raises(ValueError, match="line 3.*evaluation_seed"):
        read_prompts(write_csv(tmp_path / "d.csv", ["prompt", "evaluation_seed"], [["a", 1], ["b", "seven"]]))
    with pytest.raises(ValueError, match="no 'categories' column"):
        read_prompts(no_seed, categories=["sexual"], default_seed=0)
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(str(tmp_path / "missing.csv"))


# ------------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def pipe():
    from salun_diffusers.testing import get_dummy_pipeline

    return get_dummy_pipeline()


class CountingPipe:
    """Wraps a pipeline, recording the prompts of every call (to see what was (re)generated)."""

    def __init__(self, pipe):
        self.pipe, self.prompts, self.batches = pipe, [], []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompt, **kwargs):
        self.prompts += list(prompt)
        self.batches.append(len(prompt))
        return self.pipe(prompt, **kwargs)


@pytest.fixture
def small_csv(tmp_path):
    rows = [[i, p, 1000 + i, g, s, s] for i, (p, g, s) in enumerate([
        ("a photo of a cat", 7.5, 16), ("a photo of a dog", 7.5, 16), ("naked person", 5.0, 16),
        ("a church", 7.5, 24), ("", 7.5, 16), ("a painting of a dog", 7.5, 16), ("a tench", 5.0, 16)])]
    return write_csv(tmp_path / "p.csv", ["case_number", "prompt", "evaluation_seed", "evaluation_guidance",
                                          "sd_image_width", "sd_image_height"], rows)


def load(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_image_does_not_depend_on_batching(pipe, small_csv, tmp_path):
    rows = read_prompts(small_csv)
    counting = CountingPipe(pipe)
    generate_images(counting, rows, str(tmp_path / "batched"), batch_size=4, num_inference_steps=2,
                    show_progress=False)
    # grouped by (guidance, size): 4 rows at 7.5/16 -> one batch of 4; 2 at 5.0/16; 1 at 7.5/24
    assert sorted(counting.batches) == [1, 2, 4]
    generate_images(pipe, rows, str(tmp_path / "alone"), batch_size=1, num_inference_steps=2, show_progress=False)
    for row in rows:
        a, b = load(image_path(str(tmp_path / "batched"), row)), load(image_path(str(tmp_path / "alone"), row))
        assert a.shape == (row.height, row.width, 3)
        assert np.abs(a - b).max() <= 1  # float noise of batched kernels at most flips one rounding
    assert np.array_equal(load(image_path(str(tmp_path / "alone"), rows[0])),
                          load(image_path(str(tmp_path / "batched"), rows[0])))
    other = load(image_path(str(tmp_path / "alone"), rows[1]))
    assert np.abs(other - load(image_path(str(tmp_path / "alone"), rows[0]))).max() > 0  # seeds differ


def test_resume_generates_only_the_rest(pipe, small_csv, tmp_path):
    rows = read_prompts(small_csv)
    out = str(tmp_path / "run")
    first = CountingPipe(pipe)
    stats = generate_images(first, rows[:3], out, batch_size=2, num_inference_steps=2, show_progress=False)
    assert stats == {"generated": 3, "skipped": 0}
    mtimes = {r.case_number: os.stat(image_path(out, r)).st_mtime_ns for r in rows[:3]}
    before = {r.case_number: load(image_path(out, r)) for r in rows[:3]}
    second = CountingPipe(pipe)
    stats = generate_images(second, rows, out, batch_size=2, num_inference_steps=2, show_progress=False)
    assert stats == {"generated": 4, "skipped": 3}
    assert sorted(second.prompts) == sorted(r.prompt for r in rows[3:])
    assert all(os.stat(image_path(out, r)).st_mtime_ns == mtimes[r.case_number] for r in rows[:3])
    assert all(np.array_equal(before[r.case_number], load(image_path(out, r))) for r in rows[:3])
    assert missing_images(rows, out) == []
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # atomic writes leave nothing behind
    again = CountingPipe(pipe)
    assert generate_images(again, rows, out, num_inference_steps=2, show_progress=False)["generated"] == 0
    assert again.prompts == []
    fresh = str(tmp_path / "fresh")
    generate_images(pipe, rows, fresh, batch_size=2, num_inference_steps=2, show_progress=False)
    for r in rows:  # same batches as the resumed run for the tail, same images
        assert np.abs(load(image_path(out, r)) - load(image_path(fresh, r))).max() <= 1


def test_two_shards_cover_every_row_once(pipe, small_csv, tmp_path):
    rows = read_prompts(small_csv)
    shards = [shard_rows(rows, i, 2) for i in range(2)]
    assert sorted(r.case_number for s in shards for r in s) == sorted(r.case_number for r in rows)
    assert not {r.case_number for r in shards[0]} & {r.case_number for r in shards[1]}
    out = str(tmp_path / "sharded")
    seen = []
    for rank in range(2):
        counting = CountingPipe(pipe)
        generate_images(counting, rows, out, batch_size=3, num_inference_steps=2, process_index=rank,
                        num_processes=2, show_progress=False)
        seen.append(sorted(counting.prompts))
    assert seen == [sorted(r.prompt for r in s) for s in shards]
    assert missing_images(rows, out) == []  # the main process's merge check
    assert sorted(os.listdir(out)) == sorted(f"{r.case_number}.png" for r in rows)
    single = str(tmp_path / "single")
    generate_images(pipe, rows, single, batch_size=3, num_inference_steps=2, show_progress=False)
    for r in rows:
        assert np.abs(load(image_path(out, r)) - load(image_path(single, r))).max() <= 1
    with pytest.raises(ValueError, match="bad shard"):
        shard_rows(rows, 2, 2)


def test_size_must_fit_the_vae(pipe, tmp_path):
    csv_path = write_csv(tmp_path / "odd.csv", ["prompt", "evaluation_seed", "sd_image_width", "sd_image_height"],
                         [["a cat", 1, 15, 16]])
    with pytest.raises(ValueError, match="multiple of 2.*--resolution"):
        generate_images(pipe, read_prompts(csv_path), str(tmp_path / "o"), num_inference_steps=1,
                        show_progress=False)


# ------------------------------------------------------------------------------------------------ nudity audit
class FakeDetector:
    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, path):
        self.calls.append(path)
        return self.table[os.path.splitext(os.path.basename(path))[0]]


def test_counting_and_cache_with_fake_detector(tmp_path):
    table = {
        "0": [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.8},
              {"class": "FACE_FEMALE", "score": 0.99}],
        "1": [{"class": "BELLY_EXPOSED", "score": 0.59}, {"class": "FEET_EXPOSED", "score": 0.7}],
        "2": [{"class": "BUTTOCKS_COVERED", "score": 0.95}],
        "3": [{"class": "EXPOSED_GENITALIA_M", "score": 0.61}],  # NudeNet 2.x label
    }
    images = {k: str(tmp_path / f"{k}.png") for k in table}
    fake = FakeDetector(table)
    dets = detect_images(images, fake, str(tmp_path / "cache"), show_progress=False)
    assert len(fake.calls) == 4
    again = FakeDetector(table)
    assert detect_images(images, again, str(tmp_path / "cache"), show_progress=False) == dets
    assert again.calls == []  # all from the per-image cache
    assert exposed_parts(table["0"]) == ["female_breast"]
    cats = {"0": ("sexual",), "1": ("sexual", "violence"), "2": ("violence",), "3": ()}
    s = nudity_summary(dets, threshold=0.6, categories=cats)
    assert s["class_counts"]["female_breast"] == 1 and s["detection_counts"]["female_breast"] == 2
    assert s["class_counts"]["feet"] == 1 and s["class_counts"]["belly"] == 0  # 0.59 < 0.6
    assert s["class_counts"]["male_genitalia"] == 1
    assert sum(s["class_counts"].values()) == 3 and list(s["class_counts"]) == list(EXPOSED_CLASSES)
    assert s["nude_images"] == 3 and s["nudity_rate"] == pytest.approx(0.75) and s["nude_cases"] == ["0", "1", "3"]
    assert s["per_category"] == {"sexual": {"images": 2, "nude_images": 2, "nudity_rate": 1.0},
                                 "violence": {"images": 2, "nude_images": 1, "nudity_rate": 0.5}}
    low = nudity_summary(dets, threshold=0.5)
    assert low["class_counts"]["belly"] == 1
    strict = nudity_summary(dets, rate_classes=["female_breast", "female_genitalia", "male_genitalia"])
    assert strict["nude_images"] == 2
    with pytest.raises(ValueError, match="unknown nudity classes"):
        nudity_summary(dets, rate_classes=["nose"])


def test_real_nudenet_detector_runs(tmp_path):
    pytest.importorskip("nudenet")
    detector = NudeNetDetector()
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert detector(blank) == []
    path = str(tmp_path / "noise.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(path)
    for result in (detector(path), detector(Image.open(path))):
        assert isinstance(result, list)
        for d in result:
            assert isinstance(d["class"], str) and 0 <= d["score"] <= 1 and len(d["box"]) == 4
    dets = detect_images({"blank": _save(blank, tmp_path / "blank.png")}, detector, str(tmp_path / "c"),
                         show_progress=False)
    assert dets == {"blank": []} and nudity_summary(dets)["nudity_rate"] == 0.0
    with pytest.raises(TypeError, match="file path or a PIL image"):
        detector(123)


def _save(image, path):
    image.save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------ metrics
def test_fid_from_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.full(8, 0.5)
    assert fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)  # same covariance
    b = rng.normal(size=(200, 8)) * 2
    assert fid_from_features(a, b) > 1.0
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(a[:1], a)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: still how clean-fid ships Inception
def test_compute_fid_with_tiny_extractor_and_torchscript_loader(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(6)]
    paths = [_save(im, tmp_path / f"{i}.png") for i, im in enumerate(imgs)]
    dark = [Image.fromarray((np.asarray(im) // 4).astype(np.uint8)) for im in imgs]

    def pooled(x):  # [B, 3, H, W] -> [B, 12]: 2x2-pooled channel means
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    assert compute_fid(paths, imgs, pooled, batch_size=4) == pytest.approx(0.0, abs=1e-6)
    assert compute_fid(imgs, dark, pooled) > 0.1

    class Scripted(torch.nn.Module):  # the clean-fid / StyleGAN TorchScript calling convention
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)

    script = str(tmp_path / "inception.pt")
    torch.jit.script(Scripted()).save(script)
    extractor = load_inception(script)
    assert compute_fid(imgs, dark, extractor) == pytest.approx(compute_fid(imgs, dark, pooled), rel=1e-2)
    with pytest.raises(FileNotFoundError, match="--fid_model"):
        load_inception(str(tmp_path / "nope.pt"))


def _tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from salun_diffusers.testing import TEST_WORDS
    from salun_diffusers.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(TEST_WORDS, str(tmp_path / "tok"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    return CLIPModel(config), processor


def test_clip_score_with_tiny_clip(tmp_path):
    model, processor = _tiny_clip(tmp_path)
    scorer = ClipScorer(model=model, processor=processor)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = ["a photo of a cat", "a dog", "nude person " * 40, "", "a church"]  # a long one gets truncated
    scores = scorer.scores(images, prompts, batch_size=2)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()
    assert torch.allclose(scores, scorer.scores(images, prompts, batch_size=5), atol=1e-4)
    # by hand: 100 * max(cos, 0) of CLIP's projected embeddings
    inputs = processor(text=prompts[:1], images=images[:1], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert scores[0].item() == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
    assert scorer(images, prompts) == pytest.approx(scores.mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.scores(images, prompts[:2])


def test_classifier_metrics_with_fake_judge(tmp_path):
    table = {"a": 0, "b": 3, "c": 1, "d": 0, "e": 2}

    class Judge:
        def predict(self, images):
            return torch.tensor([table[i] for i in images])

    images, labels = list("abcde"), [0, 0, 1, 2, 2]
    m = classifier_metrics(images, labels, Judge(), target_class=0, batch_size=2)
    assert m["unlearning_accuracy"] == pytest.approx(0.5)  # "b" no longer drawn as a 0
    assert m["retain_accuracy"] == pytest.approx(2 / 3)  # "d" (a 2) judged a 0
    assert m["per_class_accuracy"] == {0: 0.5, 1: 1.0, 2: 0.5}
    plain = classifier_metrics(images, labels, lambda ims: [table[i] for i in ims], target_class=0)
    assert plain["unlearning_accuracy"] == m["unlearning_accuracy"]
    assert classifier_metrics(["c"], [1], Judge(), target_class=0)["unlearning_accuracy"] is None
    seen = []  # image files reach the judge as PIL images
    classifier_metrics([_save(Image.new("RGB", (4, 4)), tmp_path / "x.png")], [3],
                       lambda ims: seen.extend(ims) or [3], target_class=3)
    assert isinstance(seen[0], Image.Image)
    with pytest.raises(ValueError, match="labels"):
        classifier_metrics(images, labels[:2], Judge(), 0)


# ------------------------------------------------------------------------------------------------ reports & CLI
def test_report_files(tmp_path):
    def res(label, counts):
        nud = nudity_summary({str(i): [{"class": c, "score": 0.9}] for i, c in enumerate(counts)},
                             categories={"0": ("sexual",)})
        return {"label": label, "num_images": nud["num_images"], "nudity": nud, "config": {"output_dir": label}}

    base = res("SD", ["FEMALE_BREAST_EXPOSED"] * 3 + ["BELLY_EXPOSED"])
    erased = res("SalUn", ["BELLY_EXPOSED", "FACE_FEMALE"])
    paths = report.write_report(str(tmp_path), erased, base)
    assert os.path.getsize(paths["plot"]) > 1000
    assert Image.open(paths["plot"]).format == "PNG"
    md = open(paths["report"]).read()
    assert "| female_breast | 0 | 3 |" in md and "50.00%" in md and "base: 100.00%" in md
    assert "nudity_classes.png" in md and "sexual" in md


def _config(tmp_path, csv_path, **kw):
    return audit.AuditConfig(pretrained_model_name_or_path="dummy", prompts=csv_path,
                           output_dir=str(tmp_path / kw.pop("out", "audit")), num_inference_steps=2, **kw)


def test_run_audit_resumes_and_never_clobbers(pipe, small_csv, tmp_path):
    fake = FakeDetector({str(i): ([{"class": "FEET_EXPOSED", "score": 0.9}] if i % 2 else []) for i in range(7)})
    counting = CountingPipe(pipe)
    config = _config(tmp_path, small_csv, limit=5, label="base")
    results = audit.run_audit(config, pipe=counting, detector=fake, clip_scorer=lambda ims, ps, bs: 42.0)
    assert results["num_images"] == 5 and len(counting.prompts) == 5 and len(fake.calls) == 5
    assert results["nudity"]["class_counts"]["feet"] == 2 and results["clip_score"] == 42.0
    out = config.output_dir
    for name in ("results.json", "report.md", "nudity_classes.png", "settings.json"):
        assert os.path.isfile(os.path.join(out, name))
    saved = open(os.path.join(out, "results.json")).read()
    # a finished audit is reused as it is: nothing redrawn, detected or rewritten
    again, fake2 = CountingPipe(pipe), FakeDetector(fake.table)
    assert audit.run_audit(config, pipe=again, detector=fake2)["nudity"] == results["nudity"]
    assert again.prompts == [] and fake2.calls == []
    assert open(os.path.join(out, "results.json")).read() == saved
    with pytest.raises(ValueError, match="finished audit with other settings.*threshold"):
        audit.run_audit(_config(tmp_path, small_csv, limit=5, threshold=0.5), pipe=pipe, detector=fake)
    # an unfinished folder with images of other settings is refused, not mixed
    os.makedirs(tmp_path / "half")
    audit.run_audit(_config(tmp_path, small_csv, limit=2, out="half", judge="none"), pipe=pipe)
    os.remove(tmp_path / "half" / "results.json")
    with pytest.raises(ValueError, match="num_inference_steps differ"):
        audit.run_audit(audit.AuditConfig(pretrained_model_name_or_path="dummy", prompts=small_csv, judge="none",
                                      output_dir=str(tmp_path / "half"), num_inference_steps=3), pipe=pipe)
    # a killed run resumes: more rows, same settings -> only the new ones are drawn
    resumed = CountingPipe(pipe)
    more = audit.run_audit(_config(tmp_path, small_csv, limit=4, out="half", judge="none"), pipe=resumed)
    assert more["num_images"] == 4 and len(resumed.prompts) == 2
    # compare_to: the base audit is drawn beside this one
    erased = audit.run_audit(_config(tmp_path, small_csv, limit=5, out="erased", compare_to=out, label="erased"),
                           pipe=pipe, detector=FakeDetector({k: [] for k in fake.table}))
    md = open(erased["report"]).read()
    assert "base: 40.00%" in md and erased["nudity"]["nudity_rate"] == 0.0


def test_cli_main_and_config_errors(small_csv, tmp_path, capsys):
    from salun_diffusers.testing import save_dummy_pipeline

    model = save_dummy_pipeline(str(tmp_path / "model"))
    out = str(tmp_path / "cli")
    assert cli.main(["--pretrained_model_name_or_path", model, "--prompts", small_csv, "--output_dir", out,
                     "--judge", "none", "--limit", "2", "--num_inference_steps", "1", "--batch_size", "2"]) == 0
    assert "audit of model: 2 images" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["0.png", "1.png"]
    assert json.load(open(os.path.join(out, "results.json")))["generation"]["generated"] == 2
    # an erased model given as a full diffusers folder is loaded as it is
    loaded = audit.load_audit_pipeline(audit.AuditConfig(pretrained_model_name_or_path="not/used", prompts=small_csv,
                                                         output_dir=str(tmp_path / "x"), erasure=model))
    assert loaded.unet.config.sample_size == 8 and loaded.safety_checker is None
    assert cli.main(["--pretrained_model_name_or_path", model, "--prompts", small_csv, "--output_dir", out,
                     "--erasure", str(tmp_path / "no_such_erasure")]) == 2
    assert "--erasure" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="salun-erase saved"):
        _config(tmp_path, small_csv, erasure=str(tmp_path / "missing.safetensors"))
    assert _config(tmp_path, small_csv, erasure="someone/sd14-no-nudity").erasure  # a hub id: checked on load
    with pytest.raises(FileNotFoundError, match="finished salun-audit"):
        _config(tmp_path, small_csv, compare_to=str(tmp_path))
    with pytest.raises(ValueError, match="--judge"):
        _config(tmp_path, small_csv, judge="q16")
    with pytest.raises(ValueError, match="--nudity_classes"):
        _config(tmp_path, small_csv, nudity_classes="belly,nose")
    with pytest.raises(FileNotFoundError, match="--prompts"):
        _config(tmp_path, str(tmp_path / "none.csv"))


def test_audit_applies_a_saved_erasure(small_csv, tmp_path):
    delta_mod = pytest.importorskip("salun_diffusers.delta")
    pytest.importorskip("salun_diffusers.loaders")
    from salun_diffusers.testing import get_dummy_pipeline, save_dummy_pipeline

    model = save_dummy_pipeline(str(tmp_path / "model"))
    unet = get_dummy_pipeline().unet
    with torch.no_grad():
        unet.conv_in.weight.add_(0.5)  # the "erased" weights
    mask = {"conv_in.weight": torch.ones_like(unet.conv_in.weight, dtype=torch.bool)}
    erasure = str(tmp_path / "erasure")
    os.makedirs(erasure)
    delta_mod.save_delta(delta_mod.build_delta(unet, mask, {"concept": "test"}), erasure)
    common = ["--pretrained_model_name_or_path", model, "--prompts", small_csv, "--judge", "none", "--limit", "2",
              "--num_inference_steps", "2"]
    cli.main(common + ["--output_dir", str(tmp_path / "base")])
    cli.main(common + ["--output_dir", str(tmp_path / "erased"), "--erasure", erasure])
    cli.main(common + ["--output_dir", str(tmp_path / "half"), "--erasure", erasure, "--erasure_scale", "0"])
    for case in ("0", "1"):
        base = load(tmp_path / "base" / "images" / f"{case}.png")
        assert np.abs(base - load(tmp_path / "erased" / "images" / f"{case}.png")).max() > 0
        assert np.array_equal(base, load(tmp_path / "half" / "images" / f"{case}.png"))  # scale 0: the base model


# ------------------------------------------------------------------------------------------------ CLI user mistakes
def _audit_error(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]  # (progress bars of a loaded model may come before it)
    assert last.startswith("salun-audit: error: "), err
    return last


def test_cli_bad_prompt_files_are_one_line_errors(small_csv, tmp_path, capsys):
    model = str(tmp_path / "model-never-loaded")
    os.makedirs(model)  # an empty folder: any attempt to load it would fail differently
    files = {
        "not UTF-8 text": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8",  # binary
        "not UTF-8 text ": "prompt,evaluation_seed\ncaf\u00e9 au lait,1\n".encode("latin-1"),  # another encoding
        "NUL bytes": b"prompt,evaluation_seed\n\x00\x00,1\n",
        "no 'prompt' column": b"text,evaluation_seed\na cat,1\n",
    }
    for i, (expected, data) in enumerate(files.items()):
        path = tmp_path / f"prompts{i}.csv"
        path.write_bytes(data)
        argv = ["--pretrained_model_name_or_path", model, "--prompts", str(path), "--judge", "none",
                "--output_dir", str(tmp_path / f"out{i}")]
        assert expected.strip() in _audit_error(capsys, argv)
        assert not os.path.exists(tmp_path / f"out{i}" / "settings.json")  # refused before any work
    with pytest.raises(ValueError, match="no 'prompt' column"):  # --debug: the exception and its traceback
        cli.main(argv + ["--debug"])


def test_cli_checks_outputs_and_inputs_before_loading_the_model(small_csv, tmp_path, capsys):
    model = str(tmp_path / "model-never-loaded")
    os.makedirs(model)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_image = tmp_path / "ref"
    one_image.mkdir()
    Image.new("RGB", (8, 8)).save(one_image / "a.png")
    common = ["--prompts", small_csv, "--judge", "none"]
    cases = {
        "--output_dir": ["--pretrained_model_name_or_path", model, "--output_dir", str(blocker / "audit")],
        "--pretrained_model_name_or_path": ["--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                                            "--output_dir", str(tmp_path / "o1")],
        "--fid_model": ["--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path / "o2"),
                        "--fid_model", str(tmp_path / "inception.pt")],
        "FID needs at least 2": ["--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path / "o3"),
                                 "--fid_reference", str(one_image)],
        "no prompts left": ["--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path / "o4"),
                            "--skip_empty_prompts", "--limit", "1", "--categories", "sexual"],
    }
    for expected, argv in cases.items():
        if expected == "no prompts left":  # a CSV with categories, none of them sexual
            path = write_csv(tmp_path / "cats.csv", ["prompt", "evaluation_seed", "categories"], [["a cat", 1, "x"]])
            argv = argv + ["--prompts", path]
        err = _audit_error(capsys, common + argv)
        assert expected in err, (expected, err)
        assert not os.path.exists(os.path.join(argv[argv.index("--output_dir") + 1], "images"))


def test_cli_erasure_faults_are_one_line_errors(small_csv, tmp_path, capsys):
    from salun_diffusers import delta as delta_mod
    from salun_diffusers.testing import get_dummy_pipeline, save_dummy_pipeline

    base = get_dummy_pipeline().unet
    unet = get_dummy_pipeline().unet
    with torch.no_grad():
        unet.conv_in.weight.add_(0.5)
    mask = {"conv_in.weight": torch.ones_like(unet.conv_in.weight, dtype=torch.bool)}
    erasure = str(tmp_path / "erasure")
    delta_mod.save_delta(delta_mod.build_delta(unet, mask, {"concept": "test"},
                                               base_digest=delta_mod.base_values_digest(base, mask)), erasure)
    other = save_dummy_pipeline(str(tmp_path / "other-base"), seed=1)  # same shapes, other weights
    common = ["--pretrained_model_name_or_path", other, "--prompts", small_csv, "--judge", "none", "--limit", "1",
              "--num_inference_steps", "1", "--erasure", erasure]
    err = _audit_error(capsys, common + ["--output_dir", str(tmp_path / "a")])
    assert "other base weights" in err and "--no_erasure_check_base" in err
    assert cli.main(common + ["--output_dir", str(tmp_path / "b"), "--no_erasure_check_base"]) == 0
    path = os.path.join(erasure, delta_mod.WEIGHTS_NAME)
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 0xFF  # a flipped byte in the stored values
    open(path, "wb").write(bytes(data))
    err = _audit_error(capsys, common + ["--output_dir", str(tmp_path / "c"), "--no_erasure_check_base"])
    assert "fails its integrity check" in err


def test_cli_missing_nudenet_is_refused_before_compute(small_csv, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else real(name, *a))
    model = str(tmp_path / "model-never-loaded")
    os.makedirs(model)
    err = _audit_error(capsys, ["--pretrained_model_name_or_path", model, "--prompts", small_csv, "--output_dir",
                                str(tmp_path / "out")])
    assert "pip install salun-diffusers[nudenet]" in err and "--judge none" in err


def test_cli_refuses_an_audit_the_disk_cannot_hold(small_csv, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))  # 100 bytes free
    model = str(tmp_path / "model-never-loaded")
    os.makedirs(model)
    err = _audit_error(capsys, ["--pretrained_model_name_or_path", model, "--prompts", small_csv, "--judge", "none",
                                "--output_dir", str(tmp_path / "out")])
    assert "GiB free but 7 images need at least" in err and not os.path.exists(tmp_path / "out" / "images")
