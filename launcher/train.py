"""Train a seqrec model: `python launcher/train.py --config configs/demo.yaml [--set section.field=value ...]`."""

import sys

from seqrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
