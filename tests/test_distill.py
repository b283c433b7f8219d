"""Issue 17, ``--distill_steps``: re-noise the masked weights after SalUn's fine-tune and distil the erased model
back into them (UNDO). The perturbation touches masked entries only and is what it says; distillation pulls the
student back to the teacher's predictions; the whole erasure still changes no weight outside the mask, is
deterministic, resumes to the uninterrupted result; bad values and unfit setups are refused in one line. Tiny
config-built pipelines on CPU (mechanics)."""

import pytest
import torch

from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.erasure.distill import _perturb, check_distill_fits
from salun_diffusers.testing import changed_inside_mask, get_dummy_pipeline, save_flow_pipeline

DISTILL = dict(distill_steps=3, distill_noise=0.5)
ROBUST = dict(adversarial=True, alpha=8.0, adversarial_steps=2, adversarial_lr=0.05, forget_uncond_weight=2.0)


def _half_mask(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in unet.named_parameters()}


def test_the_perturbation_moves_masked_entries_only_and_as_written():
    unet = get_dummy_pipeline(0).unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    mask = _half_mask(unet)
    _perturb(unet, mask, 0.5, torch.Generator().manual_seed(1))
    eps_gen = torch.Generator().manual_seed(1)  # the same draws, in the same order (every masked tensor draws one)
    for name, p in unet.named_parameters():
        m, b = mask[name], before[name]
        assert torch.equal(p.detach()[~m], b[~m]), name  # outside the mask: bit-identical
        if not m.any():
            continue
        scale = b.std() if b.numel() > 1 else b.abs().mean()
        expected = 0.5 * b + 0.5 * scale * torch.randn(b.shape, generator=eps_gen)
        assert torch.allclose(p.detach()[m], expected[m], atol=1e-6), name
    kept = get_dummy_pipeline(0).unet
    _perturb(kept, _half_mask(kept), 0.0, torch.Generator().manual_seed(1))  # a = 0: nothing moves
    assert all(torch.equal(p.detach(), before[n]) for n, p in kept.named_parameters())


def test_only_masked_weights_change_and_the_run_is_deterministic(erase_config, dummy_pipeline_dir, tmp_path):
    kw = dict(max_train_steps=3, **ROBUST, **DISTILL)
    a = erase(erase_config(output_dir=str(tmp_path / "a"), **kw))
    b = erase(erase_config(output_dir=str(tmp_path / "b"), **kw))
    assert changed_inside_mask(a, dummy_pipeline_dir) > 0  # it trained, on the mask only
    pa, pb = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
    assert all(torch.equal(pa[n].detach(), pb[n].detach()) for n in pa)
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), max_train_steps=3, **ROBUST))
    pp = dict(plain.unet.named_parameters())
    assert any(not torch.equal(pa[n].detach(), pp[n].detach()) for n in pa)  # the phase changed the result
    assert "distill_loss" in a.metrics["final"] and "distill_loss" not in plain.metrics["final"]


def test_distillation_pulls_the_student_back_to_the_teacher(erase_config, tmp_path):
    """More distillation steps leave the re-noised student's predictions closer to the erased teacher's (the same
    erasure and perturbation; the distance: the predictions' MSE on fixed noisy latents, timesteps and
    conditionings, the forget prompt's among them)."""
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), max_train_steps=2))
    teacher, pipe = plain.unet, plain.pipeline
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, teacher.config.in_channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    ids = pipe.tokenizer(["nudity", "a photo of a dog"] * 4, padding="max_length", return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        target = teacher(x, t, cond).sample

    def distance(steps):
        r = erase(erase_config(output_dir=str(tmp_path / f"d{steps}"), max_train_steps=2, distill_steps=steps,
                               distill_noise=0.3, distill_learning_rate=1e-3))
        with torch.no_grad():
            return float((r.unet(x, t, cond).sample - target).pow(2).mean())

    assert distance(40) < 0.5 * distance(1)  # measured: 0.030 -> 0.0085


def test_resumed_run_equals_an_uninterrupted_one(erase_config, killed_and_resumed, tmp_path):
    kw = dict(max_train_steps=5, **ROBUST, **DISTILL)
    full = erase(erase_config(output_dir=str(tmp_path / "full"), **kw))
    resumed = killed_and_resumed(**kw)
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)


def test_flow_matching_transformer_keeps_every_weight_outside_the_mask(data_cache, tmp_path):
    path = save_flow_pipeline(str(tmp_path / "pipe"), "sd3")
    on = erase(EraseConfig(pretrained_model_name_or_path=path, concept="nudity", cache_dir=data_cache,
                           num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=2,
                           train_batch_size=2, seed=0, resolution=16, output_dir=str(tmp_path / "on"), **DISTILL))
    assert changed_inside_mask(on, path) > 0


@pytest.mark.parametrize("bad, message", [
    (dict(distill_steps=-1), "--distill_steps must be >= 0"),
    (dict(distill_noise=1.5), "--distill_noise must be"),
    (dict(distill_learning_rate=-1.0), "--distill_learning_rate must be >= 0"),
])
def test_bad_values_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        EraseConfig(concept="seven", **bad)
    assert "\n" not in str(err.value)


def test_where_it_does_not_fit_it_is_refused():
    with pytest.raises(ValueError, match="run one process without --shard_weights") as err:
        check_distill_fits(EraseConfig(concept="seven", distill_steps=10), num_processes=2, sharded=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="drop --distill_steps"):
        check_distill_fits(EraseConfig(concept="seven", distill_steps=10), num_processes=1, sharded=True)
    check_distill_fits(EraseConfig(concept="seven"), num_processes=2, sharded=True)  # off: nothing to refuse
