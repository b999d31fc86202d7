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

import yaml

from albef.checkpoint import load_pretrained, save_official
from albef.config import from_dict
from albef.engine.checkpointing import consolidate, find_latest
from albef.models import ModelConfig, build_model


def export(run_dir: Path, out: Path, tag: str = None) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or find_latest(ckpt_dir)
    if tag is None:
        raise SystemExit(f"no complete checkpoint under {ckpt_dir}")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model_cfg = from_dict(ModelConfig, cfg["model"], f"{run_dir / 'config.yaml'}:model")
    sd = consolidate(ckpt_dir, tag)
    kind = "pretrain" if any(k.startswith("text_encoder.bert.") for k in sd) else "retrieval"
    model = build_model(model_cfg, kind)
    load_pretrained(model, sd)  # refuses anything incomplete, by key name
    save_official(model, out, config=cfg, source=str(ckpt_dir / tag))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run folder (train.output_dir)")
    p.add_argument("--out", type=Path, required=True, help="output .pth file")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    a = p.parse_args()
    print(f"wrote {export(a.run_dir, a.out, a.tag)}")


if __name__ == "__main__":
    main()
