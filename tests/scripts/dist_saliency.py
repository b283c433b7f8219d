"""Compute saliency on a tiny denoiser under accelerate (run with 1 or N processes); save it from rank 0.

``dist_saliency.py OUT [unet|flux]``: the tiny SD U-Net (DDPM noise) or the tiny FLUX transformer (flow matching,
the FlowFamily's noise, velocity target and call)."""

import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from diffusers import DDPMScheduler

from salun_diffusers.families import FlowFamily, PromptCond
from salun_diffusers.objectives import diffusion_loss
from salun_diffusers.saliency import compute_saliency
from salun_diffusers.testing import get_dummy_components, get_flow_pipeline


def main(out_path: str, family: str = "unet") -> None:
    accelerator = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(10, 4, 8, 8, generator=g)
    if family == "flux":
        pipe = get_flow_pipeline("flux", guidance_embeds=True)
        unet, scheduler = pipe.transformer, FlowFamily(pipe, guidance_scale=3.5)
        cond = PromptCond(torch.randn(10, 6, 16, generator=g), {"pooled_projections": torch.randn(10, 8, generator=g)})
    else:
        unet = get_dummy_components(seed=0)["unet"]
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        cond = torch.randn(10, 77, 16, generator=g)
    batches = [list(range(i, min(i + 3, 10))) for i in range(0, 10, 3)]  # 4 batches, uneven last

    def loss_fn(model, idx, generator):
        return diffusion_loss(model, scheduler, latents[idx], cond[idx], generator)

    sal = compute_saliency(unet, batches, loss_fn, seed=7, accelerator=accelerator)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in sal.items()}, out_path,
                  metadata={"num_processes": str(accelerator.num_processes)})
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    from salun_diffusers.cli_args import leave_process_group

    try:
        main(*sys.argv[1:3])
    finally:  # a gloo process exiting with its group open aborts now and then (SIGABRT)
        leave_process_group()
