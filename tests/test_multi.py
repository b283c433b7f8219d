"""Several concepts in one run (issue 19): concept lists and concepts files, each concept's own pseudo prompt, one
retain set, one mask from all forget sets (three ways to combine the saliencies), and outputs naming every concept."""

import json
import os

import pytest
import torch

import train_erase
from salun_diffusers.concepts import DIGIT_WORLDS, JointConcepts, digit_prompt, read_concepts_file, resolve_concepts
from salun_diffusers.config import EraseConfig
from salun_diffusers.delta import read_delta
from salun_diffusers.erase import erase
from salun_diffusers.erasure.saliency import combine_saliencies
from salun_diffusers.masking import mask_from_saliency
from salun_diffusers.reporting import erasure_scores

# ------------------------------------------------------------------------------------------------ concept lists


def test_digits_map_onto_their_own_pseudo_digit_that_is_not_erased():
    spec = resolve_concepts(["seven", "eight", "4"])
    assert isinstance(spec, JointConcepts) and spec.name == "seven+eight+four" and spec.kind == "digit"
    pseudo = {c.name: c.pseudo_prompts for c in spec.concepts}
    # seven's next digit (eight) is erased too: it maps onto nine; eight onto nine; four onto five
    assert pseudo == {"seven": (digit_prompt(9),), "eight": (digit_prompt(9),), "four": (digit_prompt(5),)}
    assert spec.retain_prompts == tuple(digit_prompt(d) for d in (0, 1, 2, 3, 5, 6, 9))  # the erased ones left out
    assert spec.target_classes == (7, 8, 4) and spec.pipeline_classes == DIGIT_WORLDS  # the U-Net and SD3 worlds
    # one concept's steps x (1 + 0.5 (k - 1)); retain images at the preset's 32 per retain prompt
    assert spec.defaults["max_train_steps"] == 200 and spec.defaults["num_retain_images"] == 7 * 32
    assert resolve_concepts(["seven"]).concepts == (resolve_concepts("seven"),)  # one concept: as before


def test_concept_lists_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="given twice"):
        resolve_concepts(["seven", "7"])
    with pytest.raises(ValueError, match="with several concepts use presets .* concepts file"):
        resolve_concepts(["seven", "dragons"])
    with pytest.raises(ValueError, match="--forget_prompt and --pseudo_prompt describe one concept"):
        resolve_concepts(["seven", "four"], forget_prompt="a dragon")
    with pytest.raises(ValueError, match="would map onto 'a lizard', which this run erases too"):
        resolve_concepts([], rows=[{"forget_prompt": "a dragon", "pseudo_prompt": "a lizard"},
                                   {"forget_prompt": "a lizard", "pseudo_prompt": "a cat"}])
    with pytest.raises(ValueError, match="every digit is erased"):
        resolve_concepts([str(d) for d in range(10)])


def test_config_takes_several_concepts_and_round_trips():
    cfg = EraseConfig(concept="seven, four", output_dir="x")
    assert cfg.concept == ["seven", "four"] and cfg.max_train_steps == 150
    assert EraseConfig(concept=["seven"], output_dir="x").concept == "seven"  # one: a string, as before
    assert EraseConfig(output_dir="x").concept == "seven"
    again = EraseConfig.from_json_string(cfg.to_json_string())
    assert again.concept == cfg.concept and again.concept_spec() == cfg.concept_spec()
    rows = EraseConfig(pretrained_model_name_or_path="sd", output_dir="x", concept="nudity",
                       concepts=[{"pseudo_prompt": "a lizard", "forget_prompt": "a dragon"}])
    assert rows.concepts == ['{"forget_prompt": "a dragon", "pseudo_prompt": "a lizard"}']
    assert [c.name for c in rows.concept_spec().concepts] == ["nudity", "a_dragon"]
    with pytest.raises(ValueError, match="--concepts item 1 needs a forget_prompt and a pseudo_prompt"):
        EraseConfig(pretrained_model_name_or_path="sd", output_dir="x", concepts=['{"forget_prompt": "a dragon"}'])


def test_concepts_file_csv_and_json(tmp_path):
    (tmp_path / "dragons").mkdir()
    csv = tmp_path / "concepts.csv"
    csv.write_text("forget_prompt,pseudo_prompt,data_dir,name\na dragon,a lizard;a snake,dragons,dragon\n"
                   "a unicorn,a horse,,\n")
    rows = read_concepts_file(str(csv))
    assert rows == [{"forget_prompt": "a dragon", "pseudo_prompt": "a lizard;a snake",
                     "data_dir": str(tmp_path / "dragons"), "name": "dragon"},
                    {"forget_prompt": "a unicorn", "pseudo_prompt": "a horse"}]
    spec = resolve_concepts([], rows=rows)
    assert spec.concepts[0].pseudo_prompts == ("a lizard", "a snake")
    assert spec.concepts[0].forget_data_dir == str(tmp_path / "dragons") and spec.concepts[1].name == "a_unicorn"
    js = tmp_path / "concepts.json"
    js.write_text(json.dumps(rows))
    assert read_concepts_file(str(js)) == rows
    cfg = train_erase.parse_args(["--pretrained_model_name_or_path", "sd", "--concepts_file", str(csv),
                                  "--output_dir", str(tmp_path / "out")])
    assert cfg.concept == [] and [c.name for c in cfg.concept_spec().concepts] == ["dragon", "a_unicorn"]
    for content, expected in [(b"prompt,pseudo\na,b\n", "has no forget_prompt column"),
                              (b"\xff\xfe", "is not UTF-8 text"), (b"[1, 2]", "not a JSON list of objects"),
                              (b"forget_prompt,pseudo_prompt\na dragon,\n", "row 1 needs a forget_prompt and a "
                                                                            "pseudo_prompt")]:
        bad = tmp_path / "bad.csv"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"concepts file '.*bad.csv'.*{expected}"):
            read_concepts_file(str(bad))


# ------------------------------------------------------------------------------------------------ saliency


def test_normalized_and_union_combinations():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.rand(40, 50, generator=g), "b": torch.rand(30, generator=g)}
    b = {"w": torch.rand(40, 50, generator=g), "b": torch.rand(30, generator=g)}
    # normalized: a concept whose gradients are 1000x larger counts as much as before
    scaled = {n: 1000 * t for n, t in b.items()}
    m1, m2 = combine_saliencies([a, b], "normalized", 0.3, "global"), combine_saliencies([a, scaled], "normalized",
                                                                                           0.3, "global")
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    summed = mask_from_saliency({n: a[n] + scaled[n] for n in a}, 0.3)
    assert not all(torch.equal(summed[n], m1[n]) for n in m1)  # the plain sum follows the large concept
    union = combine_saliencies([a, b], "union", 0.3, "global")
    for s in (a, b):  # each concept's own top 15% is inside the union, which holds at most 30%
        own = mask_from_saliency(s, 0.15)
        assert all(bool((own[n] <= union[n]).all()) for n in own)
    total = sum(m.numel() for m in union.values())
    assert 0.15 * total <= sum(int(m.sum()) for m in union.values()) <= 0.3 * total + 2


def test_erasure_scores_of_several_digits():
    acc = {d: 1.0 for d in range(10)}
    acc.update({7: 0.0, 4: 0.1, 2: 0.9})
    s = erasure_scores(acc, [7, 4])
    assert s["unlearning_accuracy_per_digit"] == {7: 1.0, 4: pytest.approx(0.9)}
    assert s["retained_accuracy"] == pytest.approx((7 + 0.9) / 8)
    assert erasure_scores(acc, 7)["retained_accuracy"] == pytest.approx((7.1 + 0.9) / 9)


# ------------------------------------------------------------------------------------------------ a joint run


def test_a_joint_run_maps_each_concept_onto_its_own_pseudo_prompt_and_names_them_all(erase_config, tmp_path,
                                                                                  monkeypatch):
    import salun_diffusers.erasure.training as training

    seen = []
    real = training.salun_loss

    def spy(unet, scheduler, forget_latents, forget_embeds, pseudo_embeds, *args, **kwargs):
        seen.append((forget_embeds.embeds.detach().clone(), pseudo_embeds.embeds.detach().clone()))
        return real(unet, scheduler, forget_latents, forget_embeds, pseudo_embeds, *args, **kwargs)
    monkeypatch.setattr(training, "salun_loss", spy)
    cfg = erase_config(output_dir=str(tmp_path / "joint"), max_train_steps=3, saliency_combine="normalized",
                       concepts=[{"forget_prompt": "a dragon", "pseudo_prompt": "a lizard;a gecko", "name": "dragon"}])
    result = erase(cfg)
    pipe = result.pipeline
    spec = cfg.concept_spec()
    assert [c.name for c in spec.concepts] == ["nudity", "dragon"]
    enc = {p: pipe.encode_prompt(p, "cpu", 1, False)[0][0] for c in spec.concepts
           for p in (c.forget_prompt, *c.pseudo_prompts)}
    own = {c.forget_prompt: c.pseudo_prompts for c in spec.concepts}
    kinds = set()
    for forget, pseudo in seen:  # every forget sample is paired with one of its own concept's pseudo prompts
        for f, p in zip(forget, pseudo):
            name = next(n for n in own if torch.allclose(f, enc[n]))
            assert any(torch.allclose(p, enc[q]) for q in own[name]), name
            kinds.add(name)
    assert kinds == set(own)  # both concepts were trained on
    meta = read_delta(result.erasure_path)[1]["config"]
    assert meta["concept"] == "nudity+dragon"
    assert [c["name"] for c in meta["erased_concepts"]] == ["nudity", "dragon"]
    assert meta["erased_concepts"][1]["pseudo_prompts"] == ["a lizard", "a gecko"]
    card = open(os.path.join(cfg.output_dir, "README.md")).read()
    assert "**nudity**, **dragon** (erased jointly, one mask)" in card and "| forget prompt (dragon) | a dragon |" in card
    assert "concepts combined: normalized" in card


def test_forget_data_dir_with_several_concepts_is_refused_before_any_work(erase_config, tmp_path, monkeypatch):
    import salun_diffusers.erase as erase_module

    monkeypatch.setattr(erase_module, "load_erasure_base", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match="--forget_data_dir holds one concept's images; with several concepts"):
        erase(erase_config(forget_data_dir=str(tmp_path / "imgs"),
                           concepts=[{"forget_prompt": "a dragon", "pseudo_prompt": "a lizard"}]))
    with pytest.raises(ValueError, match="--concepts data_dir '.*missing' does not exist"):
        erase(erase_config(concepts=[{"forget_prompt": "a dragon", "pseudo_prompt": "a lizard",
                                      "data_dir": str(tmp_path / "missing")}]))
