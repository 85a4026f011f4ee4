"""`python -m model.hf import|export ...`: the command stays where users know it; the file I/O it
does lives in train/checkpoint/hf_cli.py (model/ holds no I/O code)."""

import sys

if __name__ == "__main__":
    from train.checkpoint.hf_cli import main

    sys.exit(main())
