#!/usr/bin/env python
"""Digit-world protocol: the bundled digit model (with or without an erasure), 20 prompts per digit, judged by the
bundled digit classifier: unlearning accuracy of the erased digit and accuracy on the other nine.

    python evaluation/digit_world.py --output_dir audits/digit-base
    python evaluation/digit_world.py --erasure out/no-seven --output_dir audits/no-seven --compare_to audits/digit-base

Any salun-audit flag may be added or overridden.
"""

import sys

from salun_diffusers.evaluation.cli import run_protocol

if __name__ == "__main__":
    sys.exit(run_protocol("evaluation/digit_world.py", __doc__.split("\n")[0], {"--judge": "digit"}, table="digits"))
