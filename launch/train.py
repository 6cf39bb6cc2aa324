"""Entry point for `accelerate launch launch/train.py --config freeze_vit.yaml [overrides]`.

The same code as `advcap train`: local runs, accelerate and SLURM all end here.
"""

import sys

from advcap.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
