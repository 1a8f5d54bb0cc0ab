#!/usr/bin/env python
"""Convert demonstrations.

    # control/obs mode through ManiSkill's replay, rewards recorded in the task's reward mode
    python tools/convert_demos.py replay raw.h5 -c pd_ee_delta_pos -o state --output out.h5
    # ManiSkill .h5 (+ .json) to robomimic .hdf5
    python tools/convert_demos.py to-robomimic out.h5 --output out.hdf5

Same as ``flowmanip demos replay`` / ``flowmanip demos to-robomimic``.
"""
import sys

from flowmanip.cli import main

if __name__ == "__main__":
    main(["demos", *sys.argv[1:]])
