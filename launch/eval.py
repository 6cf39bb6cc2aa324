"""Entry point for `accelerate launch launch/eval.py RUN_DIR [--select best-val] [--conditions ...] [--splits ...]`.

The same code as `advcap eval`: ranks caption disjoint parts of each split and the results are gathered.
"""

import sys

from advcap.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
