#!/usr/bin/env python
"""Generate ManiSkill motion-planning demos (pd_joint_pos, .h5 + .json).

    python tools/generate_demos.py PickCube-v1 -n 100 --seed-start 10000 --workers 2 -o demos/pickcube.h5

Same as ``flowmanip demos generate``.
"""
import sys

from flowmanip.cli import main

if __name__ == "__main__":
    main(["demos", "generate", *sys.argv[1:]])
