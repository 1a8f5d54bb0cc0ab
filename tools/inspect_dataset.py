#!/usr/bin/env python
"""Check a demonstration file and print its summary (episodes, steps, shapes, modes, action ranges).

    python tools/inspect_dataset.py datasets/pickcube/pickcube_pd_ee_delta_pos.h5 [--json]

Same as ``flowmanip demos inspect``.
"""
import sys

from flowmanip.cli import main

if __name__ == "__main__":
    main(["demos", "inspect", *sys.argv[1:]])
