"""Where training metrics go: a console progress bar, ``metrics.jsonl`` in the run folder, and W&B (rank 0 only).

W&B runs offline when no API key is configured (``wandb sync <run>/wandb/offline-run-*`` uploads later) and is
resumed with the run id stored in the run folder, so a requeued job keeps appending to the same W&B run.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "albef"
    entity: Optional[str] = None
    name: Optional[str] = None  # default: the run folder's name
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: str = "auto"  # auto (online if an API key is configured, else offline) | online | offline | disabled

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb.mode={self.mode!r}: expected auto, online, offline or disabled")


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or Path("~/.netrc").expanduser().is_file()
        and "api.wandb.ai" in Path("~/.netrc").expanduser().read_text(errors="ignore")
    )
    return "online" if has_key else "offline"


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger whose calls do nothing."""

    def __init__(
        self,
        run_dir: Path,
        cfg: WandbConfig,
        run_config: Dict,
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_id: Optional[str] = None,
    ):
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_id = wandb_id
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        mode = _wandb_mode(cfg.mode)
        if cfg.enabled and mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / ".wandb_cache"))
            # Logged tables travel as run artifacts whose files (thumbnails, table JSON) W&B stages under its data
            # dir until `wandb sync`: keep them in the run folder, not in ~/.local/share.
            os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / ".wandb_data"))
            # The id also lives in the run folder, so a job killed before its first checkpoint keeps its W&B run.
            id_file = run_dir / "wandb_id"
            if not wandb_id and id_file.is_file():
                wandb_id = id_file.read_text().strip()
            self.wandb_id = wandb_id or secrets.token_hex(4)  # W&B ids: [a-z0-9]{8} by convention
            id_file.write_text(self.wandb_id + "\n")
            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                group=cfg.group,
                tags=cfg.tags or None,
                config=run_config,
                id=self.wandb_id,
                resume="allow",
                mode=mode,
                dir=str(run_dir),
            )
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not sys.stderr.isatty() and os.environ.get("ALBEF_PROGRESS") != "1",
        )
        self._t0 = time.time()

    def log(self, step: int, metrics: Dict[str, float], console: bool = True, media: Optional[Dict] = None) -> None:
        """One row: JSONL + W&B (+ console). ``media`` (W&B images/tables) go to W&B only, in the same row."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _num(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._wandb(lambda run: run.log({**metrics, **(media or {})}, step=step))
        if console:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if not k.startswith("time/"))
            msg = f"step {step} {shown}"
            if self._bar is not None and not self._bar.disable:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def advance(self, n: int, postfix: Dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def summary(self, values: Dict) -> None:
        if not self.enabled:
            return
        self._wandb(lambda run: [run.summary.__setitem__(k, v) for k, v in values.items()])
        self._jsonl.write(json.dumps({"summary": values}) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._wandb(lambda run: run.finish())

    def _wandb(self, fn) -> None:
        """Call W&B; if it fails (its service died, e.g. on the SIGTERM that SLURM sends every process), warn once
        and go on without it: the JSONL file keeps every metric, and a checkpoint must never be lost to logging."""
        if self.wandb_run is None:
            return
        try:
            fn(self.wandb_run)
        except Exception as e:  # noqa: BLE001 - any W&B failure
            print(f"warning: W&B logging failed ({type(e).__name__}: {e}); continuing without W&B", file=sys.stderr)
            self.wandb_run = None


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
