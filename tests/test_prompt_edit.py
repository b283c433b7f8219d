"""Issue 17, ``--uce_prompt_edit``: UCE's closed-form key / value edit on top of SalUn's erasure. The result is UCE's
solution on the trained U-Net, only the saliency mask and the edited projections differ from the base (bit-identical
elsewhere), the erasure loads onto the base with plain ``load_erasure`` (its base fingerprint is the base's), resume
equals an uninterrupted run, and what it cannot take is refused in one line. Tiny config-built pipelines on CPU
(mechanics, seconds)."""

import pytest
import torch

from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.erasure.prompt_edit import nearer_forget, round_images
from salun_diffusers.families import load_base_pipeline
from salun_diffusers.loaders import load_erasure
from salun_diffusers.masking import load_mask
from salun_diffusers.methods import UCE_PRESETS, UceConfig, uce_edit, uce_projections
from salun_diffusers.testing import save_flow_pipeline


def test_the_erasure_is_uce_on_the_trained_unet_and_loads_onto_the_base(erase_config, dummy_pipeline_dir, tmp_path):
    """The flag's U-Net is exactly UCE's closed form applied to the plain run's trained U-Net (same seed: the training
    does not see the flag); outside the saliency mask and the edited projections every weight is the base's; the
    erasure file spans both and loads onto the base (its base fingerprint checked) to the same weights."""
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), max_train_steps=2))
    config = erase_config(output_dir=str(tmp_path / "edited"), max_train_steps=2, uce_prompt_edit=True)
    edited = erase(config)
    spec = config.concept_spec()
    erased = [spec.forget_prompt]
    uce = uce_edit(plain.unet, plain.pipeline.tokenizer, plain.pipeline.text_encoder, erased, [spec.pseudo_prompts[0]],
                   [p for p in spec.retain_prompts if p not in erased], UceConfig(**UCE_PRESETS["sd14"]))
    assert set(uce) == set(uce_projections(plain.unet)) and len(uce) > 0
    trained = dict(plain.unet.named_parameters())
    base = dict(load_base_pipeline(dummy_pipeline_dir).unet.named_parameters())
    saliency, _ = load_mask(edited.mask_path)  # mask.safetensors stays the saliency mask (reusable with --mask_path)
    only_edited = 0
    for name, p in edited.unet.named_parameters():
        p, m = p.detach(), saliency[name]
        if name in uce:
            assert torch.equal(p, uce[name]), name
            only_edited += int((p[~m] != base[name].detach()[~m]).sum())
        else:
            assert torch.equal(p, trained[name].detach()), name
            assert torch.equal(p[~m], base[name].detach()[~m]), name
    assert only_edited > 0  # the edit moved projection entries the saliency mask does not hold
    fresh = load_base_pipeline(dummy_pipeline_dir)
    load_erasure(fresh, edited.erasure_path)
    loaded = dict(fresh.unet.named_parameters())
    assert all(torch.equal(p.detach(), loaded[n].detach()) for n, p in edited.unet.named_parameters())


@pytest.mark.parametrize("adversarial", [True, False])  # attacks started from the bank / from the forget prompt
def test_adversarial_rounds_move_only_the_projections_and_are_deterministic(erase_config, dummy_pipeline_dir, tmp_path,
                                                                            adversarial):
    """``--uce_adversarial_rounds``: the round re-solves the projections away from the plain edit's (same training),
    every weight outside the saliency mask and the projections stays the base's, and a rerun is bit-identical."""
    kw = dict(max_train_steps=2, adversarial=adversarial, uce_prompt_edit=True)
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), **kw))
    kw.update(uce_adversarial_rounds=2, uce_adversarial_steps=3)  # 2: the measured setting
    runs = [erase(erase_config(output_dir=str(tmp_path / f"rounds{i}"), **kw)) for i in range(2)]
    kw.update(uce_adversarial_rounds=1)
    one = erase(erase_config(output_dir=str(tmp_path / "one_round"), **kw))
    projections = set(uce_projections(plain.unet))
    base = dict(load_base_pipeline(dummy_pipeline_dir).unet.named_parameters())
    saliency, _ = load_mask(runs[0].mask_path)
    first, second, edit, single = (dict(r.unet.named_parameters()) for r in (*runs, plain, one))
    for name, p in first.items():
        assert torch.equal(p.detach(), second[name].detach()), name
        if name in projections:  # the second round's rows join the first's: a new solve
            assert not torch.equal(p.detach(), edit[name].detach()), name
            assert not torch.equal(p.detach(), single[name].detach()), name
        else:
            assert torch.equal(p.detach(), edit[name].detach()), name
            assert torch.equal(p.detach()[~saliency[name]], base[name].detach()[~saliency[name]]), name


def test_rounds_attack_the_images_asked_for_in_batch_chunks(erase_config, tmp_path):
    """``--uce_adversarial_images``: left unset it is 64, here more than the forget set has, so every image is
    attacked (bit-identical to asking for all 4 or for 9, two batch chunks); one batch (2) finds other rows, so only the
    projections differ (the training does not see the flag)."""
    kw = dict(max_train_steps=2, adversarial=True, uce_prompt_edit=True, uce_adversarial_rounds=1,
              uce_adversarial_steps=3)  # the forget set: 4 images, the batch: 2
    runs = {n: dict(erase(erase_config(output_dir=str(tmp_path / str(n)), uce_adversarial_images=n,
                                       **kw)).unet.named_parameters()) for n in (None, 2, 4, 9)}
    projections = set(uce_projections(erase(erase_config(output_dir=str(tmp_path / "edit"), max_train_steps=1,
                                                         uce_prompt_edit=True)).unet))
    for name, p in runs[None].items():
        assert torch.equal(p.detach(), runs[4][name].detach()), name
        assert torch.equal(p.detach(), runs[9][name].detach()), name
        assert torch.equal(p.detach(), runs[2][name].detach()) == (name not in projections), name
    assert EraseConfig(concept="seven", uce_prompt_edit=True, uce_adversarial_rounds=2).uce_adversarial_images == 64
    assert EraseConfig(concept="seven", uce_prompt_edit=True).uce_adversarial_images is None


def test_rounds_take_images_from_every_concept_in_turn():
    ids = torch.tensor([0, 0, 0, 1, 1, 2])  # three concepts' forget images, each concept's in a block
    assert round_images(ids, 4).tolist() == [0, 3, 5, 1]
    assert round_images(ids, 99).tolist() == [0, 3, 5, 1, 4, 2]
    assert round_images(torch.zeros(5, dtype=torch.long), 3).tolist() == [0, 1, 2]  # one concept: the first ones


def test_filter_keeps_rows_at_least_as_near_the_forget_prompt():
    """``--uce_adversarial_filter``: a row is kept when its cosine to its image's forget row at its position is at
    least its cosine to every retain row there; ties (positions all prompts share) kept; no retain prompt: all kept."""
    forget = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]])  # [n=1, L=3, D=2]
    retain = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
                           [[-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [M=2, L, D]; position 2 shared by all
    adv = torch.tensor([[[2.0, 1.0], [1.0, 3.0], [5.0, 5.0]]])
    # position 0: cos 0.89 to forget, 0.45 / -0.89 to retain: kept; position 1: 0.32 to forget, 0.95 to the second
    # retain prompt: dropped; position 2: a tie: kept
    assert nearer_forget(adv, forget, retain).tolist() == [[True, False, True]]
    assert nearer_forget(adv, forget, retain[:0]).tolist() == [[True, True, True]]
    assert nearer_forget(adv * 7.0, forget, retain).tolist() == [[True, False, True]]  # cosine: scale-free


def test_filtered_rounds_change_only_the_projections(erase_config, tmp_path):
    """The filter changes the rounds' solve and nothing else (the training does not see it); it needs the rounds."""
    kw = dict(max_train_steps=2, adversarial=True, uce_prompt_edit=True, uce_adversarial_rounds=1,
              uce_adversarial_steps=3)
    plain, filtered = (dict(erase(erase_config(output_dir=str(tmp_path / str(f)), uce_adversarial_filter=f,
                                               **kw)).unet.named_parameters()) for f in (False, True))
    projections = set(uce_projections(erase(erase_config(output_dir=str(tmp_path / "edit"), max_train_steps=1,
                                                         uce_prompt_edit=True)).unet))
    for name, p in plain.items():
        assert torch.equal(p.detach(), filtered[name].detach()) == (name not in projections), name
    with pytest.raises(ValueError, match="add --uce_adversarial_rounds or drop --uce_adversarial_filter"):
        EraseConfig(concept="seven", uce_prompt_edit=True, uce_adversarial_filter=True)


def test_rounds_need_the_edit():
    with pytest.raises(ValueError, match="add --uce_prompt_edit"):
        EraseConfig(concept="seven", uce_adversarial_rounds=1)
    with pytest.raises(ValueError, match="add --uce_adversarial_rounds or drop --uce_adversarial_images"):
        EraseConfig(concept="seven", uce_prompt_edit=True, uce_adversarial_images=64)


def test_resumed_run_equals_an_uninterrupted_one(resumed_equals_full):
    kw = dict(max_train_steps=4, uce_prompt_edit=True)
    assert resumed_equals_full(**kw)


def test_a_flow_model_is_refused_in_one_line(data_cache, tmp_path):
    path = save_flow_pipeline(str(tmp_path / "pipe"), "sd3")
    config = EraseConfig(pretrained_model_name_or_path=path, concept="nudity", cache_dir=data_cache,
                         num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=2,
                         train_batch_size=2, learning_rate=1e-2, seed=0, resolution=16, uce_prompt_edit=True,
                         output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--uce_prompt_edit fits StableDiffusionPipeline.*drop --uce_prompt_edit"):
        erase(config)


def test_a_peer_method_refuses_the_flag(dummy_pipeline_dir):
    with pytest.raises(ValueError, match="--uce_prompt_edit does not apply to --method esd-x"):
        EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", method="esd-x",
                    uce_prompt_edit=True)
    with pytest.raises(ValueError, match="--uce_adversarial_rounds does not apply to --method uce"):
        EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", method="uce",
                    uce_adversarial_rounds=1)
