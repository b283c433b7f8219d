#!/usr/bin/env python
"""Image-quality protocol: FID against reference images and CLIP score on COCO prompts.

    python evaluation/fid_clip_coco.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --erasure out/sd14-no-nudity --fid_reference coco/val2014 --output_dir audits/coco-salun

Any salun-audit flag may be added or overridden (--prompts coco_30k.csv, --fid_model inception-2015-12-05.pt).
"""

import sys

from salun_diffusers.data import data_file
from salun_diffusers.evaluation.cli import run_protocol

if __name__ == "__main__":
    sys.exit(run_protocol("evaluation/fid_clip_coco.py", __doc__.split("\n")[0],
                          {"--judge": "none", "--clip_model": "openai/clip-vit-large-patch14",
                           "--prompts": data_file("prompts", "coco_10k.csv")}, table="coco"))
