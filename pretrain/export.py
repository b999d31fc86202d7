"""Consolidate a training checkpoint (any ZeRO stage, any precision) into one float32 file in the official layout.

    python -m pretrain.export runs/my_run --out my_albef.pth              # newest complete checkpoint
    python -m pretrain.export runs/my_run --tag step000010000 --out x.pth

The result is ``{'model': state_dict}`` with the official ALBEF keys (0-d ``temp``), loadable by our finetune
entrypoints (``init.checkpoint=x.pth``) and by the official code. The weights are validated by loading them into a
freshly built model of the run's configuration before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from albef.engine.checkpointing import export_official_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run folder (train.output_dir)")
    p.add_argument("--out", type=Path, required=True, help="output .pth file")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    a = p.parse_args()
    try:
        print(f"wrote {export_official_file(a.run_dir, a.out, a.tag)}")
    except FileNotFoundError as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()
