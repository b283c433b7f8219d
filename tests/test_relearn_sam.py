"""Issue 17, ``--relearn_rho``: the sharpness-aware forget step (erasure/sharpness.py). Off it is SalUn's step; on, the
move (one step or ``--relearn_steps k``) is undone bit for bit, only masked weights train, resume equals an
uninterrupted run, and what it cannot run is refused. Tiny config-built pipeline on CPU (mechanics, seconds)."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from salun_diffusers import load_mask
from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.erasure import training
from salun_diffusers.erasure.sharpness import RelearnPerturbation, check_relearn_fits
from salun_diffusers.families import denoiser, load_base_pipeline, model_family
from salun_diffusers.masking import mask_from_saliency
from salun_diffusers.objectives import salun_loss
from salun_diffusers.testing import PlainBackward, get_dummy_pipeline, save_dummy_pipeline, save_flow_pipeline

ROBUST = dict(adversarial=True, alpha=8.0, adversarial_steps=2, adversarial_lr=0.05)


def _weights(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _masked_change(run, other, base_dir):
    """Asserts ``run``'s weights outside its mask are bit-identical to the base's; returns (entries it changed inside
    the mask, entries where it differs from ``other``'s weights)."""
    mask, _ = load_mask(run.mask_path)
    base = dict(UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").named_parameters())
    other_w = dict(other.unet.named_parameters())
    changed = differs = 0
    for name, p in run.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name].detach()[~m]), name  # bit-identical outside the mask
        changed += int((p.detach()[m] != base[name].detach()[m]).sum())
        differs += int((p.detach() != other_w[name].detach()).sum())
    return changed, differs


def test_the_move_is_one_normalised_relearning_step_and_is_undone_bit_for_bit():
    pipe = get_dummy_pipeline(0)
    unet, family = pipe.unet, model_family(pipe)
    names = [n for n, _ in unet.named_parameters()]
    mask = mask_from_saliency({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
                               for i, (n, p) in enumerate(unet.named_parameters())}, 0.5)
    for n in names[:3]:  # tensors with no masked entry are frozen by the training loop: relearning moves them too
        mask[n].zero_()
        dict(unet.named_parameters())[n].requires_grad_(False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    for scope, direction in (("all", "gradient"), ("mask", "gradient"), ("all", "sign"), ("mask", "sign")):
        before = _weights(unet)
        config = EraseConfig(pretrained_model_name_or_path="x", concept="nudity", relearn_rho=0.3, relearn_scope=scope,
                             relearn_direction=direction)
        move = RelearnPerturbation(unet, mask, config)
        move.apply(unet, family, latents, embeds, torch.Generator().manual_seed(3), check=lambda norm: None)
        moved = _weights(unet)
        step = torch.linalg.vector_norm(torch.cat([(moved[n] - before[n]).flatten() for n in names]))
        torch.testing.assert_close(step, torch.tensor(0.3), rtol=1e-4, atol=0)  # ||delta|| = rho
        for n in names:
            outside = moved[n][~mask[n]] != before[n][~mask[n]]
            assert bool(outside.any()) == (scope == "all") or before[n][~mask[n]].numel() == 0, (scope, n)
        assert all(torch.equal(moved[n], before[n]) for n in names[:3]) == (scope == "mask")
        if direction == "sign":  # every moved entry by the same amount
            steps = torch.cat([(moved[n] - before[n])[mask[n] | (scope == "all")].abs() for n in names])
            assert float(steps.max() - steps.min()) < 1e-6 * 0.3
        move.undo()
        assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())  # bit for bit
        assert not any(dict(unet.named_parameters())[n].requires_grad for n in names[:3])  # flags restored
        assert all(p.grad is None for p in unet.parameters())  # autograd.grad: nothing accumulated


def test_k_inner_steps_are_k_one_step_moves_of_rho_over_k_each_recomputed_at_the_moved_weights():
    """``--relearn_steps k``: the move is k successive normalised steps of rho / k, each direction taken at the weights
    the previous steps reached, on the generator's next noise (so bit for bit k one-step moves of rho / k chained on
    one generator); it spans what its scope says, differs from the one straight step, and is undone bit for bit."""
    pipe = get_dummy_pipeline(0)
    unet, family = pipe.unet, model_family(pipe)
    names = [n for n, _ in unet.named_parameters()]
    mask = mask_from_saliency({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
                               for i, (n, p) in enumerate(unet.named_parameters())}, 0.5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def move(rho, steps, scope, direction, gen=None):
        config = EraseConfig(pretrained_model_name_or_path="x", concept="nudity", relearn_rho=rho,
                             relearn_steps=steps, relearn_scope=scope, relearn_direction=direction)
        m = RelearnPerturbation(unet, mask, config)
        m.apply(unet, family, latents, embeds, gen or torch.Generator().manual_seed(3), check=lambda norm: None)
        return m

    for scope, direction in (("mask", "sign"), ("all", "sign"), ("mask", "gradient")):
        before = _weights(unet)
        one = move(0.6, 1, scope, direction)
        straight = _weights(unet)
        one.undo()
        three = move(0.6, 3, scope, direction)
        moved = _weights(unet)
        three.undo()
        assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())  # undone bit for bit
        assert all(p.grad is None for p in unet.parameters())
        gen, chain = torch.Generator().manual_seed(3), []
        for _ in range(3):  # the same move by hand: three one-step moves of 0.6 / 3 on one generator
            chain.append(move(0.6 / 3, 1, scope, direction, gen))
        assert all(torch.equal(p.detach(), moved[n]) for n, p in unet.named_parameters()), (scope, direction)
        for m in reversed(chain):
            m.undo()
        assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())
        delta = {n: moved[n] - before[n] for n in names}
        if scope == "mask":  # only masked entries move
            assert all(not bool(delta[n][~mask[n]].any()) for n in names)
        assert any(bool(delta[n][~mask[n]].any()) for n in names) == (scope == "all")
        net = float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in delta.values()])))
        assert 0 < net <= 0.6 * (1 + 1e-4)  # path length 0.6; the net move no longer
        assert any(not torch.equal(moved[n], straight[n]) for n in names)  # not the straight step


def test_one_inner_step_is_the_default_bit_for_bit(erase_config, tmp_path):
    kw = dict(max_train_steps=2, relearn_rho=0.5, relearn_direction="sign", **ROBUST)
    default = erase(erase_config(output_dir=str(tmp_path / "default"), **kw))
    one = erase(erase_config(output_dir=str(tmp_path / "one"), relearn_steps=1, **kw))
    a, b = dict(default.unet.named_parameters()), dict(one.unet.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_several_inner_steps_train_only_masked_weights_and_change_the_step(erase_config, dummy_pipeline_dir,
                                                                             tmp_path):
    kw = dict(max_train_steps=2, relearn_rho=0.5, relearn_direction="sign", **ROBUST)
    one = erase(erase_config(output_dir=str(tmp_path / "one"), **kw))
    three = erase(erase_config(output_dir=str(tmp_path / "three"), relearn_steps=3, **kw))
    changed, differs = _masked_change(three, one, dummy_pipeline_dir)
    assert changed > 0 and differs > 0  # it trained, and the inner steps changed the step


def test_rho_zero_is_salun(erase_config, tmp_path):
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), **ROBUST))
    off = erase(erase_config(output_dir=str(tmp_path / "off"), relearn_rho=0.0, relearn_scope="mask", **ROBUST))
    a, b = dict(plain.unet.named_parameters()), dict(off.unet.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)  # 0 = off: the loop is main's, bit for bit


def test_the_two_pass_step_with_a_zero_move_has_salun_gradient():
    """The sharpness-aware step with rho 0 computes the forget term (with the adversarial one) and alpha x the retain
    term in two passes; SalUn's in one batched pass: the same gradients up to float32 summation order."""
    pipe = get_dummy_pipeline(0)
    unet, family = pipe.unet, model_family(pipe)
    g = torch.Generator().manual_seed(0)
    lat, r_lat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    f_emb, pseudo, r_emb, adv = (torch.randn(2, 77, unet.config.cross_attention_dim, generator=g) for _ in range(4))
    config = EraseConfig(pretrained_model_name_or_path="x", concept="nudity", alpha=3.0, relearn_rho=1.0,
                         adversarial_weight=2.0)
    loss, _, _ = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, 3.0, torch.Generator().manual_seed(5),
                            adv, 2.0)
    loss.backward()
    want = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.zero_grad(set_to_none=True)
    move = RelearnPerturbation(unet, {}, config)
    move.rho = 0.0
    total, forget, retain = training.sharpness_aware_backward(
        PlainBackward, unet, family, move, lat, f_emb, pseudo, r_lat, r_emb, config, torch.Generator().manual_seed(5),
        adv, seed=7, step=1)
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=0)
    assert move.last_norm > 0 and move.saved is None
    for n, p in unet.named_parameters():
        scale = float(want[n].abs().max())
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("scope", ["all", "mask"])
def test_robust_mode_with_the_move_keeps_every_weight_outside_the_mask(scope, erase_config, dummy_pipeline_dir,
                                                                       tmp_path):
    off = erase(erase_config(output_dir=str(tmp_path / "off"), max_train_steps=2, **ROBUST))
    on = erase(erase_config(output_dir=str(tmp_path / "on"), max_train_steps=2, relearn_rho=0.5, relearn_scope=scope,
                            **ROBUST))
    changed, differs = _masked_change(on, off, dummy_pipeline_dir)
    assert changed > 0 and differs > 0  # it trained, and the move changed the step


def test_resumed_run_with_the_move_equals_an_uninterrupted_one(resumed_equals_full):
    kw = dict(max_train_steps=4, adversarial_every=3, relearn_rho=0.5, **ROBUST)
    assert resumed_equals_full(**kw)


def test_what_the_move_cannot_run_is_refused_in_one_line(erase_config):
    with pytest.raises(ValueError, match="--relearn_rho .*--optimizer_in_backward"):
        erase_config(relearn_rho=0.5, optimizer_in_backward=True)
    with pytest.raises(ValueError, match="--relearn_rho must be >= 0"):
        erase_config(relearn_rho=-1.0)
    with pytest.raises(ValueError, match="--relearn_steps must be >= 1"):
        erase_config(relearn_rho=0.5, relearn_steps=0)
    with pytest.raises(ValueError, match="--relearn_scope"):
        erase_config(relearn_rho=0.5, relearn_scope="layer")
    with pytest.raises(ValueError, match="--relearn_direction"):
        erase_config(relearn_rho=0.5, relearn_direction="adam")
    with pytest.raises(ValueError, match="does not apply to --method esd-x"):
        erase_config(method="esd-x", relearn_rho=0.5, learning_rate=None, max_train_steps=None,
                     adam_weight_decay=None, num_forget_images=None, num_retain_images=None,
                     data_num_inference_steps=None, train_batch_size=None)
    config = erase_config(relearn_rho=0.5)
    for processes, sharded in ((2, False), (1, True)):
        with pytest.raises(ValueError, match="--relearn_rho runs in one process"):
            check_relearn_fits(config, processes, sharded)
    check_relearn_fits(erase_config(), 2, True)  # off: nothing to refuse


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_the_move_on_other_families_keeps_every_weight_outside_the_mask(family, data_cache, tmp_path):
    """SD3 (flow matching, with --adversarial) and SDXL (added conditioning; --adversarial does not fit it): the
    relearning gradient goes through the family's own loss, and only masked weights change."""
    if family == "sd3":
        path, extra = save_flow_pipeline(str(tmp_path / "pipe"), "sd3"), dict(ROBUST, resolution=16)
    else:
        path, extra = save_dummy_pipeline(str(tmp_path / "pipe"), family="sdxl"), {}
    config = EraseConfig(pretrained_model_name_or_path=path, concept="nudity", output_dir=str(tmp_path / "out"),
                         cache_dir=data_cache, num_forget_images=4, num_retain_images=4, data_num_inference_steps=2,
                         max_train_steps=2, train_batch_size=2, learning_rate=1e-2, seed=0, relearn_rho=0.5,
                         relearn_direction="sign", **extra)
    result = erase(config)
    mask, _ = load_mask(result.mask_path)
    base = {n: p.detach().clone() for n, p in denoiser(load_base_pipeline(path)).named_parameters()}
    changed = 0
    for name, p in result.unet.named_parameters():
        assert torch.equal(p.detach()[~mask[name]], base[name][~mask[name]]), name
        changed += int((p.detach()[mask[name]] != base[name][mask[name]]).sum())
    assert changed > 0


def test_several_processes_are_refused_before_any_image_is_drawn(tmp_path):
    """The erasure refuses --relearn_rho with several processes at its start, before data or saliency."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    base_dir = save_dummy_pipeline(str(tmp_path / "base"))
    config = EraseConfig(pretrained_model_name_or_path=base_dir, concept="nudity", output_dir=str(tmp_path / "out"),
                         cache_dir=str(tmp_path / "cache"), relearn_rho=0.5, num_forget_images=2, resolution=16)
    two = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU, is_main_process=True)
    with pytest.raises(ValueError, match="--relearn_rho runs in one process"):
        erase(config, accelerator=two)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.png"))
