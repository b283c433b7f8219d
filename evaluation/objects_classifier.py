#!/usr/bin/env python
"""Object protocol (SalUn, Imagenette classes): an image classifier judges each prompt's class; unlearning
accuracy of the erased class and accuracy on the others.

    python evaluation/objects_classifier.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --erasure out/sd14-no-church --target_class church --output_dir audits/no-church

Any salun-audit flag may be added or overridden (--judge_model: any transformers image classifier).
"""

import sys

from salun_diffusers.data import data_file
from salun_diffusers.evaluation.cli import run_protocol

if __name__ == "__main__":
    sys.exit(run_protocol("evaluation/objects_classifier.py", __doc__.split("\n")[0],
                          {"--judge": "classifier", "--judge_model": "microsoft/resnet-50",
                           "--prompts": data_file("prompts", "imagenette.csv")}, table="objects"))
