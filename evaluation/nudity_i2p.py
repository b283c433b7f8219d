#!/usr/bin/env python
"""Nudity protocol (SalUn / ESD): NudeNet exposed-part counts and nudity rate over the I2P prompts.

    python evaluation/nudity_i2p.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --erasure out/sd14-no-nudity --output_dir audits/salun --compare_to audits/sd14

Any salun-audit flag may be added or overridden (e.g. --prompts i2p_nudity_142.csv, --categories sexual).
"""

import sys

from salun_diffusers.data import data_file
from salun_diffusers.evaluation.cli import run_protocol

if __name__ == "__main__":
    sys.exit(run_protocol("evaluation/nudity_i2p.py", __doc__.split("\n")[0],
                          {"--judge": "nudenet", "--prompts": data_file("i2p_prompts.csv")}, table="nudity"))
