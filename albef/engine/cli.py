"""The command line shared by every entrypoint: ``CONFIG.yaml [key=value ...]``.

Accepts (and ignores) ``--local_rank=N``, which the deepspeed launcher appends. Exits with the trainer's code:
0 when the planned steps are done, 75 when a signal made it checkpoint and stop (requeue me), 1 on errors.
After a clean finish the process ends with ``os._exit`` so that DeepSpeed's gloo threads cannot abort the
interpreter's shutdown (seen in about 1 of 3 world-size-2 CPU runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from albef.config import ConfigError, load_config


def main(task_cls, argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=f"albef {task_cls.name}", description=task_cls.__doc__)
    parser.add_argument("config", help="YAML file (see pretrain/configs, finetune/configs)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 model.grad_checkpointing=true"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    from albef.engine import signals

    signals.install()  # before any slow import: a SIGTERM/SIGUSR1 during start-up must not kill the job
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        cfg = load_config(task_cls.config_cls, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    from albef.engine import dist
    from albef.engine.trainer import Trainer

    summary = Trainer(cfg, task_cls(cfg)).fit()
    dist.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(summary["exit_code"])
