"""Training checkpoints on top of DeepSpeed's ``save_checkpoint``: completion markers, keep-last-K, resume, export.

Layout of ``<run>/checkpoints/``::

    step000001000/                  DeepSpeed files (mp_rank_00_model_states.pt, *optim_states.pt)
        rank00000_state.json        per-rank state: the data loader's position (the RNG is re-seeded every
                                    micro-step from (seed, rank, micro-step), so there is no RNG state to keep)
        COMPLETE                    written by rank 0 after every rank finished writing: step, world size, files
        universal/                  made on demand when a run resumes on another number of ranks
    latest_complete                 the tag of the newest complete checkpoint (atomic rename)

A checkpoint counts only when its ``COMPLETE`` marker exists (it lists every file with its size), so a job killed
while saving resumes from the previous good one, and so does a job whose newest checkpoint was damaged later. A
complete checkpoint is never written into again. Every load is a weights-only unpickling (``safe_loads``): a
tampered checkpoint file cannot run code, it fails to load with the checkpoint's name. A checkpoint written by
another number of ranks loads through DeepSpeed's universal checkpoint (``prepare_universal``). ``consolidate``
turns any of them (ZeRO-partitioned or not) into one float32 state dict in the official ALBEF layout
(``pretrain/export.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from albef.engine import dist
from albef.fsutil import atomic_write, fsync_path

log = logging.getLogger(__name__)
_TAG = re.compile(r"^step(\d{9})$")
LATEST = "latest_complete"
BEST = "best.json"


@contextlib.contextmanager
def safe_loads():
    """Every ``torch.load`` inside (DeepSpeed's own included, which pass ``weights_only=False``) unpickles weights
    only: tensors, containers, numbers, strings, plus DeepSpeed's loss-scaler records (plain attributes), its ZeRO
    stage enum and its fragment addresses (two integers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _load_error(tag_dir: Path, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"{tag_dir}: cannot load this checkpoint safely ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Its files hold something other than weights "
        "and plain data (tampered, or not written by this code), or they are damaged."
    )


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank (raised on every rank, with every rank's reason)."""


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_tags(ckpt_dir: Path) -> List[str]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(tags)


def damage(tag_dir: Path) -> Optional[str]:
    """Why the complete checkpoint ``tag_dir`` cannot be loaded (a file missing or of another size than when it
    was marked complete), or None. Markers written before the file list existed are taken as they are."""
    try:
        files = json.loads((tag_dir / "COMPLETE").read_text()).get("files", {})
    except (OSError, ValueError) as e:
        return f"unreadable COMPLETE marker ({e})"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was written"
    return None


def find_latest(ckpt_dir: Path) -> Optional[str]:
    """The newest complete checkpoint tag that is not damaged (newer damaged ones are skipped with a warning), or
    None when there is no complete checkpoint. Complete checkpoints that are all damaged are an error: a run must
    not start over silently."""
    tags = complete_tags(ckpt_dir)
    for tag in reversed(tags):
        problem = damage(ckpt_dir / tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is damaged (%s): falling back to the previous complete one", ckpt_dir / tag, problem)
    if tags:
        raise RuntimeError(
            f"{ckpt_dir}: every complete checkpoint is damaged ({', '.join(tags)}; see the warnings "
            "above); repair one, or start a new run in another train.output_dir"
        )
    return None


LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scale_state(scaler) -> Dict:
    """The state of a DeepSpeed loss scaler (fp16's ``DynamicLossScaler``; a static one has only ``cur_scale``)."""
    return {k: getattr(scaler, k) for k in LOSS_SCALE_FIELDS if hasattr(scaler, k)}


def restore_loss_scale(scaler, state: Optional[Dict]) -> None:
    """Put a saved ``loss_scale_state`` back. DeepSpeed's universal-checkpoint load (another world size) restores
    the parameter and optimizer fragments only: ZeRO's ``_load_universal_checkpoint`` never reaches
    ``_load_global_state``, so fp16's dynamic loss scale would restart at its initial value."""
    for k, v in (state or {}).items():
        if hasattr(scaler, k):
            setattr(scaler, k, v)


def _loss_scaler(engine):
    return getattr(getattr(engine, "optimizer", None), "loss_scaler", None)


def save(engine, ckpt_dir: Path, step: int, client_state: Dict, rank_state: Dict, rank: int, keep_last: int) -> str:
    """Write the checkpoint of ``step`` on every rank, then mark it complete. A checkpoint that is already complete
    is never written into (a kill during the rewrite would leave a damaged checkpoint marked complete): it holds
    this very step already, so it is kept as it is."""
    tag = tag_for(step)
    if (ckpt_dir / tag / "COMPLETE").is_file():
        log.info("checkpoint %s is already complete: not written again", ckpt_dir / tag)
        return tag
    tag_dir = ckpt_dir / tag
    error = None
    try:
        scaler = _loss_scaler(engine)
        if scaler is not None:
            client_state = {**client_state, "loss_scale": loss_scale_state(scaler)}
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk: every rank must hear of it
        error = e
        dist.barrier()  # the barrier that ends save_checkpoint, where the other ranks wait
    if error is None:
        try:
            atomic_write(tag_dir / f"rank{rank:05d}_state.json", json.dumps(rank_state))
            # DeepSpeed's torch.save does not fsync: each rank flushes the files it wrote (on a shared filesystem
            # only the writer's fsync reaches the disk) before rank 0 marks the checkpoint complete
            for path in tag_dir.iterdir():
                if f"zero_pp_rank_{rank}_" in path.name or (rank == 0 and "model_states" in path.name):
                    fsync_path(path)
        except Exception as e:  # noqa: BLE001
            error = e
    failures = [
        (r, m)
        for r, m in enumerate(dist.gather_objects(None if error is None else f"{type(error).__name__}: {error}"))
        if m
    ]
    if failures:
        raise CheckpointError(
            "; ".join(f"checkpoint {tag} failed on rank {r}: {m}" for r, m in failures)
            + f" ({tag_dir} is incomplete; the previous complete checkpoint is kept)"
        ) from error
    if rank == 0:
        world = dist.rank_and_world()[1]
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
        atomic_write(tag_dir / "COMPLETE", json.dumps({"step": step, "world_size": world, "files": files}))
        atomic_write(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, newest=tag)
    dist.barrier()
    return tag


def mark_best(ckpt_dir: Path, tag: str, metrics: Dict) -> None:
    """Record ``tag`` as the best checkpoint so far (protected from pruning)."""
    atomic_write(ckpt_dir / BEST, json.dumps({"tag": tag, "metrics": metrics}))


def best_tag(ckpt_dir: Path) -> Optional[str]:
    p = ckpt_dir / BEST
    return json.loads(p.read_text())["tag"] if p.is_file() else None


def _prune(ckpt_dir: Path, keep_last: int, newest: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (and the best one); remove older ones and leftovers."""
    complete = complete_tags(ckpt_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed = [t for t in doomed if t != best_tag(ckpt_dir)]
    doomed += [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p.name < newest and p.name not in complete]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def saved_world_size(ckpt_dir: Path, tag: str) -> int:
    return int(json.loads((ckpt_dir / tag / "COMPLETE").read_text())["world_size"])


def is_partitioned(tag_dir: Path) -> bool:
    """ZeRO-1/2 checkpoints hold the optimizer state in one partition file per rank."""
    return any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))


UNIVERSAL = "universal"


def prepare_universal(ckpt_dir: Path, tag: str, rank: int) -> None:
    """DeepSpeed's universal checkpoint of ``tag`` (``ds_to_universal``: one file per parameter, optimizer moments
    included, loadable at any number of ranks), made once by rank 0 in ``<tag>/universal`` (renamed there when
    whole). The checkpoint's own files are left as they are."""
    tag_dir = ckpt_dir / tag
    if rank == 0 and not (tag_dir / UNIVERSAL).is_dir():
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        tmp = tag_dir / f"{UNIVERSAL}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(tag_dir),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        log.info(
            "converting %s to a universal checkpoint (it was written by %d ranks)",
            tag_dir,
            saved_world_size(ckpt_dir, tag),
        )
        try:
            with safe_loads():
                ds_to_universal.main(args)
        except Exception as e:  # noqa: BLE001
            raise _load_error(tag_dir, e) from e
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync_path(path)
        os.replace(tmp, tag_dir / UNIVERSAL)
        fsync_path(tag_dir)
    dist.barrier()


def load(engine, ckpt_dir: Path, tag: str, rank: int, model=None) -> Tuple[Dict, Optional[Dict]]:
    """Load ``tag`` into ``engine``. Returns (client state, this rank's state, None when the checkpoint was written
    by another number of ranks). At another world size a ZeRO-1/2 checkpoint loads from its universal form
    (``prepare_universal``; the engine must be built with ``checkpoint.load_universal``), and ``model``'s frozen
    parameters and buffers (momentum encoders, queues: outside the optimizer, whole on every rank) from the
    checkpoint's module state."""
    tag_dir = ckpt_dir / tag
    world = dist.rank_and_world()[1]
    same_world = saved_world_size(ckpt_dir, tag) == world
    universal = not same_world and is_partitioned(tag_dir)
    try:
        with safe_loads():
            if universal:
                _, client_state = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
                module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
                trainable = {n for n, p in model.named_parameters() if p.requires_grad}
                rest = {k: v for k, v in module["module"].items() if k not in trainable}
                missing = [k for k in model.state_dict() if k not in trainable and k not in rest]
                if missing:
                    raise KeyError(f"frozen parameters/buffers missing from the checkpoint: {missing[:5]}")
                model.load_state_dict(rest, strict=False)
                scaler = _loss_scaler(engine)
                if scaler is not None:
                    restore_loss_scale(scaler, (client_state or {}).get("loss_scale"))
            else:
                _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler or DeepSpeed raised, say which checkpoint
        raise _load_error(tag_dir, e) from e
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
    if not same_world:
        return client_state, None
    return client_state, json.loads((tag_dir / f"rank{rank:05d}_state.json").read_text())


def consolidate(ckpt_dir: Path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """One float32 state dict (our key names) from a checkpoint, whatever its ZeRO stage and precision.

    The model-states file holds every buffer and frozen parameter (the momentum encoders, kept in float32);
    trainable parameters come from the float32 master copies in the optimizer partitions when there are any.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or find_latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    tag_dir = ckpt_dir / tag
    try:
        with safe_loads():
            sd = dict(
                torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
            )
            if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                sd.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    except Exception as e:  # noqa: BLE001
        raise _load_error(tag_dir, e) from e
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def export_official_file(run_dir: Path, out: Path, tag: Optional[str] = None) -> Path:
    """Consolidate a checkpoint of ``run_dir`` and write it in the official layout, validated by a strict load into a
    model built from the run's ``config.yaml``."""
    import yaml

    from albef.config import from_dict
    from albef.models import ModelConfig, build_model
    from albef.models.convert import load_pretrained, model_kind_of, save_official

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or find_latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    model_cfg = from_dict(ModelConfig, cfg["model"], f"{Path(run_dir) / 'config.yaml'}:model")
    sd = consolidate(ckpt_dir, tag)
    kind = model_kind_of(sd)
    model = build_model(model_cfg, kind)
    load_pretrained(model, sd)  # refuses anything incomplete, by key name
    save_official(model, out, config=cfg, source=str(ckpt_dir / tag))
    return Path(out)
