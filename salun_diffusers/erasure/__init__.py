"""The phases of a SalUn erasure run, one module each; :func:`salun_diffusers.erase.erase` runs them in order.

* :mod:`.data`        base pipeline, forget / retain images (generated + cached, or folders), latents, prompt embeddings
* :mod:`.saliency`    gradient saliency of the forget loss -> top-k mask (or a saved mask)
* :mod:`.training`    masked fine-tuning with the SalUn objective under accelerate
* :mod:`.checkpoints` checkpoint-N folders: find, resume, prune
* :mod:`.peers`       ``--method esd-* | uce | advunlearn``: the peer methods' presets and runners (instead of 1-3)
* :mod:`.outputs`     the output folder: checks before work, erasure file, merged U-Net, metrics, model card
"""
