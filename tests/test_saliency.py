import os
import subprocess
import sys

import pytest
import torch

from salun_diffusers.masking import mask_from_saliency
from salun_diffusers.saliency import accumulate_gradients, compute_saliency

HERE = os.path.dirname(os.path.abspath(__file__))


def test_accumulated_gradient_is_the_sum_over_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    xs = [torch.randn(4, 5) for _ in range(3)]

    def loss_fn(m, x, generator):
        return m(x).pow(2).mean()

    grads = accumulate_gradients(model, xs, loss_fn)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in xs:
        g = torch.autograd.grad(loss_fn(model, x, None), list(model.parameters()))
        for (n, _), gi in zip(model.named_parameters(), g):
            expected[n] += gi
    for n in expected:
        torch.testing.assert_close(grads[n], expected[n])
    sal = compute_saliency(model, xs, loss_fn)
    assert all(torch.equal(sal[n], grads[n].abs()) for n in grads)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


def test_saliency_rejects_non_finite_loss_and_empty_data():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="forget loss"):
        compute_saliency(model, [0], lambda m, b, g: m.weight.sum() * float("nan"))
    with pytest.raises(ValueError, match="empty"):
        compute_saliency(model, [], lambda m, b, g: m.weight.sum())


@pytest.mark.parametrize("family,port", [("unet", "29517"), ("flux", "29519")])
def test_two_process_saliency_equals_single_process(tmp_path, family, port):
    """torchrun (what `accelerate launch` uses) with 2 CPU processes gives the single-process saliency and mask, for
    a U-Net and for a FLUX transformer (flow matching)."""
    script = os.path.join(HERE, "scripts", "dist_saliency.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, double = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    subprocess.run([sys.executable, script, single, family], check=True, env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", port, script, double, family], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(single, "pt") as a, safe_open(double, "pt") as b:
        assert a.metadata()["num_processes"] == "1" and b.metadata()["num_processes"] == "2"
        s1 = {k: a.get_tensor(k) for k in a.keys()}
        s2 = {k: b.get_tensor(k) for k in b.keys()}
    assert s1.keys() == s2.keys()
    for k in s1:  # equal up to float summation order
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6 * float(s1[k].abs().max()) + 1e-12)
    m1, m2 = mask_from_saliency(s1, 0.5), mask_from_saliency(s2, 0.5)
    total = sum(m.numel() for m in m1.values())
    differ = sum(int((m1[k] != m2[k]).sum()) for k in m1)
    assert differ <= 1e-4 * total, f"{differ} of {total} mask entries differ"
