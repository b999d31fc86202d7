"""The training loop: DeepSpeed ZeRO around a Task, for pretraining and fine-tuning alike.

    python -m pretrain.train pretrain/configs/tiny_cpu.yaml train.max_steps=50      # 1 process
    torchrun --nproc_per_node 2 -m pretrain.train pretrain/configs/tiny_cpu.yaml    # 2 processes
    srun python -m pretrain.train pretrain/configs/4m.yaml                          # SLURM, one task per GPU

What the engine guarantees:

* **Batch sizes** have one owner, ``train``: gradient accumulation = global / (micro x world), written into the
  DeepSpeed config together with both batch sizes, so they cannot disagree.
* **Momentum encoders** are frozen parameters outside the optimizer. Under fp16/bf16 they are kept in float32
  (the EMA adds 0.5% per step, which bf16 would round away) and run under autocast. The EMA runs on each
  rank on identical weights, so the copies stay equal without communication. ZeRO stage 3 partitions parameters,
  which the in-forward EMA cannot see whole: it is refused with a message.
* **Queues** are filled from an all-gather of every rank's momentum features (as the official code), so they are
  identical on every rank; ``queue_size % (micro x world) == 0`` is checked before anything starts.
* **Reproducibility**: the RNG is re-seeded before every micro-step from (seed, rank, micro-step), so a resumed run
  draws the same hard negatives, masks and dropout as an uninterrupted one.
* **Checkpoints** every ``save_every`` steps, at the end, and on SIGUSR1/SIGTERM (then the process exits with
  ``EXIT_REQUEUE`` = 75 so that a SLURM script can requeue), also when the signal comes during an evaluation
  (its loops stop at the next batch, ``signals.until_stop``), ``evaluate_only`` or the final export;
  ``resume=auto`` continues from the newest complete one.
* **Non-finite losses** skip the micro-step (no backward), **non-finite gradients** the optimizer step (DeepSpeed's
  ZeRO optimizers, or ``FiniteAdamW`` without ZeRO); a skip changes no state (the momentum encoders and queues the
  forward pass moved are put back), is counted, and ``max_nonfinite_steps`` in a row stop the run. fp16 gradient
  overflow is DeepSpeed's dynamic loss scaler's business (its skipped steps are put back too, not counted).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict

import torch
import yaml

from albef.data.transforms import to_device
from albef.engine import checkpointing, dist, signals
from albef.engine.flops import measured_matmul_peak
from albef.engine.metrics import MetricsLogger
from albef.engine.optim import build_optimizer
from albef.engine.schedule import albef_lr, alpha_at, cosine_lr
from albef.engine.signals import StopRequested
from albef.engine.task import Progress, Task

log = logging.getLogger(__name__)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later": the job saved a checkpoint and wants to be requeued


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63)


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_ds_config(path: str) -> Path:
    """A DeepSpeed JSON path as given, else relative to the repository (jobs may start in another directory)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    if (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise FileNotFoundError(f"train.ds_config={path}: not found (also tried {REPO_ROOT / p})")


def ds_config_for(path: str, micro: int, global_batch: int, world: int) -> Dict:
    path = resolve_ds_config(path)
    with open(path) as f:
        cfg = json.load(f)
    if (global_batch // micro) % world:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not divisible by micro_batch_size x world size = "
            f"{micro} x {world}"
        )
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in cfg:
            raise ValueError(f"{path}: remove {key!r}; batch sizes come from the train section of the YAML")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage >= 3:
        raise ValueError(
            f"{path}: ZeRO stage 3 partitions parameters, but ALBEF's momentum update and its momentum forward "
            "need every weight whole inside the forward pass; use stage 1 or 2 (with CPU offload if memory is short)"
        )
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(f"{path}: the optimizer and LR schedule are owned by the train section of the YAML")
    cfg.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=global_batch // (micro * world),
    )
    return cfg


class Trainer:
    def __init__(self, cfg, task: Task):
        self.cfg = cfg
        self.task = task
        self.train = cfg.train

    # ------------------------------------------------------------------------------------------------------
    def _resume_tag(self, ckpt_dir: Path):
        mode = self.train.resume
        if mode == "none":
            if checkpointing.complete_tags(ckpt_dir):
                raise FileExistsError(
                    f"{ckpt_dir} already holds checkpoints; pass train.resume=auto to continue that run, or choose "
                    "another train.output_dir"
                )
            return ckpt_dir, None
        if mode == "auto":
            return ckpt_dir, checkpointing.find_latest(ckpt_dir)
        p = Path(mode)
        if (p / "COMPLETE").is_file():
            return p.parent, p.name
        tag = checkpointing.find_latest(p)
        if tag is None:
            raise FileNotFoundError(f"train.resume={mode}: no complete checkpoint there")
        return p, tag

    def _init_weights(self, model) -> None:
        from albef.models.convert import init_text_from_hf, init_vit_from_deit, load_pretrained

        init = self.cfg.init
        if init.checkpoint:
            log.info(load_pretrained(model, init.checkpoint).summary())
        if init.vit:
            init_vit_from_deit(model, init.vit)
        if init.bert:
            init_text_from_hf(model, init.bert)

    def _set_lr(self, optimizer, step: int, steps_per_epoch: int, total_steps: int) -> float:
        t = self.train
        if t.schedule == "albef":
            lr = albef_lr(
                step, steps_per_epoch, t.epochs, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps, t.warmup_granularity
            )
        else:
            lr = cosine_lr(step, total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------------------------------------------
    def fit(self) -> Dict:
        import deepspeed

        from albef.tokenizer import Tokenizer

        t = self.train
        env = dist.detect()
        device = dist.init(env, t.collective_timeout_s)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        run_dir = Path(t.output_dir)
        ckpt_root, resume_tag = self._resume_tag(run_dir / "checkpoints")
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            name = "config.yaml" if resume_tag is None else f"config.resume-{resume_tag}.yaml"
            (run_dir / name).write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=False))

        ds_cfg = ds_config_for(t.ds_config, t.micro_batch_size, t.global_batch_size, env.world_size)
        gas = ds_cfg["gradient_accumulation_steps"]
        self.task.check_batch_geometry(self.cfg.model, t.micro_batch_size * env.world_size)
        half = (
            ds_cfg.get("bf16", {}).get("enabled")
            and torch.bfloat16
            or ds_cfg.get("fp16", {}).get("enabled")
            and torch.float16
            or None
        )
        dtype = half or torch.float32

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        if resume_tag is None:
            self._init_weights(model)
        if t.evaluate_only:
            return self._evaluate_only(model, env, device, dtype, run_dir)
        momentum_fp32 = model.momentum_state_fp32() if half else None
        stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps, check_finite=stage == 0)
        saved_world = checkpointing.saved_world_size(ckpt_root, resume_tag) if resume_tag else env.world_size
        if saved_world != env.world_size and checkpointing.is_partitioned(ckpt_root / resume_tag):
            # another number of ranks: ZeRO's per-rank optimizer partitions are re-cut by DeepSpeed's universal
            # checkpoint, which the engine must be told about when it is built
            checkpointing.prepare_universal(ckpt_root, resume_tag, env.rank)
            ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        if half:
            model.keep_momentum_fp32(momentum_fp32)
        engine.train()

        tokenizer = Tokenizer()
        loader = self.task.build_train_loader(tokenizer, env.rank, env.world_size, t.micro_batch_size, t.seed)
        steps_per_epoch = len(loader) // gas
        if steps_per_epoch == 0:
            raise ValueError(
                f"one epoch holds {len(loader)} micro-batches per rank, fewer than one optimizer step "
                f"({gas} micro-batches): add data or lower train.global_batch_size"
            )
        total_steps = t.max_steps or t.epochs * steps_per_epoch

        state = {"step": 0, "micro_step": 0, "epoch": 0, "samples": 0, "nonfinite_total": 0, "wandb_id": None}
        if resume_tag is not None:
            client, rank_state = checkpointing.load(engine, ckpt_root, resume_tag, env.rank, model)
            if half:  # the checkpoint holds the momentum weights in float32; DeepSpeed's load may have cast them
                model.keep_momentum_fp32(client["momentum_fp32"])
            state.update(client["train_state"])
            if rank_state is not None:
                loader.load_state_dict(rank_state["loader"])
            else:
                self._resume_data_on_new_world(loader, ckpt_root / resume_tag, saved_world, env.rank)
            log.info(
                "resumed from %s at step %d (written by %d ranks, now %d)",
                ckpt_root / resume_tag,
                state["step"],
                saved_world,
                env.world_size,
            )
            best = ckpt_root / checkpointing.BEST  # the best score's one owner (a checkpoint may predate it)
            if best.is_file():
                metrics = json.loads(best.read_text())["metrics"]
                key = f"{self.task.eval_splits[0]}/{self.task.primary_metric}" if self.task.eval_splits else None
                if key in metrics:
                    state["best"] = metrics[key]
        else:
            loader.set_epoch(0)
        # A checkpoint taken on an epoch's last batch restores the loader at the next epoch: that epoch is over
        # (its end-of-epoch evaluation may still be due).
        epoch_ended = loader.epoch > state["epoch"]
        state["epoch"] = loader.epoch

        logger = MetricsLogger(
            run_dir, self.cfg.wandb, asdict(self.cfg), env.is_main, total_steps, state["step"], state["wandb_id"]
        )
        state["wandb_id"] = logger.wandb_id
        peak = t.peak_tflops * 1e12 or measured_matmul_peak(dtype, device)
        signals.install()  # (again: entrypoints install it first thing; Trainer may also be used directly)

        def checkpoint() -> None:
            client = {"train_state": dict(state)}
            if half:
                client["momentum_fp32"] = model.momentum_state_fp32()
            checkpointing.save(
                engine, ckpt_root, state["step"], client, {"loader": loader.state_dict()}, env.rank, t.keep_last
            )

        def evaluate() -> None:
            results = self._run_eval(model, device, dtype)
            state["evaluated_step"] = state["step"]
            if not results:
                return
            logger.log(state["step"], results, media=self.task.pop_media())
            key = f"{self.task.eval_splits[0]}/{self.task.primary_metric}"
            if key in results and results[key] > state.get("best", float("-inf")):
                state["best"] = results[key]
                checkpoint()
                if env.is_main:
                    checkpointing.mark_best(ckpt_root, checkpointing.tag_for(state["step"]), results)
                state["last_saved"] = state["step"]

        # A skipped micro-step or optimizer step changes no state: what the forward pass mutates (momentum encoders,
        # queues, queue pointer: the frozen parameters and the buffers) is copied before each micro-step, and before
        # each optimizer step's first micro-step, and put back when the micro-step or the step is skipped.
        def forward_state():
            return [p.data for p in model.parameters() if not p.requires_grad] + list(model.buffers())

        before_micro = [torch.empty_like(x) for x in forward_state()]
        before_step = [torch.empty_like(x) for x in forward_state()] if gas > 1 else before_micro
        window_micro = 0  # good micro-steps so far in this optimizer step

        def nonfinite(what: str) -> None:
            nonlocal nonfinite_run
            nonfinite_run += 1
            state["nonfinite_total"] += 1
            log.warning(
                "non-finite %s at step %d (%d in a row): skipped, no state changed", what, state["step"], nonfinite_run
            )
            if nonfinite_run >= t.max_nonfinite_steps:
                raise FloatingPointError(f"{nonfinite_run} non-finite losses in a row (train.max_nonfinite_steps)")

        window = {"loss": 0.0, "n": 0, "data": 0.0, "compute": 0.0, "flops": 0.0, "logs": {}}
        t_start, nonfinite_run = time.time(), 0
        exit_code = 0
        try:
            if (
                epoch_ended
                and self.task.eval_splits
                and state["epoch"] % t.eval_every_epochs == 0
                and state.get("evaluated_step") != state["step"]
            ):
                evaluate()
            while state["step"] < total_steps:
                t_data = time.perf_counter()
                for batch in loader:
                    t_compute = time.perf_counter()
                    window["data"] += t_compute - t_data
                    torch.manual_seed(step_seed(t.seed, env.rank, state["micro_step"]))
                    state["micro_step"] += 1
                    batch = {k: to_device(v, device, dtype) for k, v in batch.items()}
                    lr = self._set_lr(optimizer, state["step"], steps_per_epoch, total_steps)
                    progress = Progress(
                        state["step"],
                        state["epoch"],
                        alpha_at(state["step"], steps_per_epoch, t.alpha, t.alpha_warmup_epochs),
                        state["step"] >= t.itm_random_negative_steps,
                    )
                    if window_micro == 0 and gas > 1:
                        torch._foreach_copy_(before_step, forward_state())
                    torch._foreach_copy_(before_micro, forward_state())
                    loss, logs = self.task.training_step(engine, batch, progress)
                    flags = dist.all_reduce_max(
                        float(not math.isfinite(loss.item())) + 2.0 * (signals.received() is not None)
                    )
                    if flags % 2 >= 1:
                        torch._foreach_copy_(forward_state(), before_micro)
                        nonfinite("loss")
                    else:
                        engine.backward(loss)
                        skipped = engine.skipped_steps
                        engine.step()
                        window_micro += 1
                        if engine.global_steps > state["step"]:  # an optimizer step boundary
                            window_micro = 0
                            if engine.skipped_steps > skipped:  # non-finite gradients (fp16: loss-scale overflow)
                                torch._foreach_copy_(forward_state(), before_step)
                                if not engine.fp16_enabled():
                                    nonfinite("gradients")
                            else:
                                nonfinite_run = 0
                        window["loss"] += loss.item()
                        for k, v in logs.items():
                            window["logs"][k] = window["logs"].get(k, 0.0) + float(v)
                        window["n"] += 1
                        window["flops"] += self.task.step_flops(batch)
                    window["compute"] += time.perf_counter() - t_compute
                    boundary = engine.global_steps > state["step"]
                    if boundary:
                        state["step"] = engine.global_steps
                        state["samples"] += t.global_batch_size
                        logger.advance(1, {"loss": loss.item(), "lr": lr})
                        if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                            self._log(logger, engine, model, state, window, lr, progress.alpha, peak, env.world_size)
                            window = {"loss": 0.0, "n": 0, "data": 0.0, "compute": 0.0, "flops": 0.0, "logs": {}}
                        if flags >= 2:
                            raise StopRequested()
                        if t.save_every and state["step"] % t.save_every == 0:
                            checkpoint()
                            state["last_saved"] = state["step"]
                        if (
                            t.eval_every_steps
                            and self.task.eval_splits
                            and state["step"] % t.eval_every_steps == 0
                            and state["step"] < total_steps
                        ):
                            evaluate()
                        if state["step"] >= total_steps:
                            break
                    t_data = time.perf_counter()
                else:
                    state["epoch"] += 1
                    loader.set_epoch(state["epoch"])
                    if self.task.eval_splits and state["epoch"] % t.eval_every_epochs == 0:
                        evaluate()
            if self.task.eval_splits and state.get("evaluated_step") != state["step"]:
                evaluate()
            if state.get("last_saved") != state["step"]:
                checkpoint()
            if t.export_final and env.is_main:
                best = checkpointing.best_tag(ckpt_root)
                for name, tag in (("final.pth", None), ("best.pth", best)) if best else (("final.pth", None),):
                    if signals.received() is not None:  # the checkpoint is saved: a rerun exports
                        raise StopRequested()
                    checkpointing.export_official_file(run_dir, run_dir / name, tag)
        except StopRequested:
            # every rank is here together: at a step boundary (flags all-reduced), or leaving an evaluation
            # (signals.until_stop); an export is rank 0's alone and comes after the final checkpoint
            if state.get("last_saved") != state["step"]:
                checkpoint()
                state["last_saved"] = state["step"]
            exit_code = EXIT_REQUEUE
            log.warning(
                "checkpoint saved at step %d after signal %s; exiting with %d for requeue",
                state["step"],
                signals.received(),
                EXIT_REQUEUE,
            )
        elapsed = time.time() - t_start
        summary = {
            "exit_code": exit_code,
            "steps": state["step"],
            "total_steps": total_steps,
            "samples": state["samples"],
            "epochs_completed": round(state["step"] / steps_per_epoch, 3),
            "train_seconds": round(elapsed, 2),
            "nonfinite_skipped": state["nonfinite_total"],
            "data_skipped": loader.stats(),
            "wandb_id": state["wandb_id"],
        }
        logger.summary(summary)
        logger.close()
        if env.is_main:
            print("run summary: " + json.dumps(summary), flush=True)
        return summary

    @staticmethod
    def _resume_data_on_new_world(loader, tag_dir: Path, saved_world: int, rank: int) -> None:
        """The data position after a change of world size. Every saved rank stopped after the same number of
        batches of the same epoch, so rank 0's position says where all of them were; the loader deals the samples
        none of them delivered over this run's ranks (a new phase of the epoch, see the loaders' load_state_dict).
        The bad-sample counts of all saved ranks go to rank 0, so their sum over ranks stays right."""
        states = [json.loads((tag_dir / f"rank{r:05d}_state.json").read_text())["loader"] for r in range(saved_world)]
        state = dict(states[0])
        stats: collections.Counter = collections.Counter()
        for s in states:
            stats.update(s.get("stats") or {})
        state["stats"] = dict(stats) if rank == 0 else {}
        loader.load_state_dict(state)

    def _run_eval(self, model, device, dtype) -> Dict[str, float]:
        if not self.task.eval_splits:
            return {}
        was_training = model.training
        model.eval()
        results = {}
        for split in self.task.eval_splits:
            t0 = time.time()
            for k, v in self.task.evaluate(model, split, device, dtype).items():
                results[f"{split}/{k}"] = v
            results[f"time/eval_{split}_s"] = time.time() - t0
        model.train(was_training)
        return results

    def _evaluate_only(self, model, env, device, dtype, run_dir) -> Dict:
        if not self.cfg.init.checkpoint:
            log.warning("train.evaluate_only without init.checkpoint: evaluating randomly initialised weights")
        model.to(device=device, dtype=dtype)
        try:
            results = self._run_eval(model, device, dtype)
        except StopRequested:  # nothing to keep: the rerun evaluates again
            log.warning(
                "evaluation stopped by signal %s; exiting with %d for requeue", signals.received(), EXIT_REQUEUE
            )
            summary = {"exit_code": EXIT_REQUEUE, "evaluate_only": True}
            if env.is_main:
                print("run summary: " + json.dumps(summary), flush=True)
            return summary
        summary = {"exit_code": 0, "evaluate_only": True, **results}
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
            print("run summary: " + json.dumps(summary), flush=True)
        return summary

    def _log(self, logger, engine, model, state, window, lr, alpha, peak, world) -> None:
        n = max(1, window["n"])
        step_time = (window["data"] + window["compute"]) / max(1, n) * engine.gradient_accumulation_steps()
        metrics = {f"train/{k}": v / n for k, v in window["logs"].items()}
        metrics.update(
            {
                "train/loss": window["loss"] / n,
                "train/lr": lr,
                "train/alpha": alpha,
                "train/epoch": state["epoch"],
                "train/samples": state["samples"],
                "perf/samples_per_s": self.train.global_batch_size / step_time if step_time else 0.0,
                "time/data_s": window["data"] / n,
                "time/compute_s": window["compute"] / n,
                "perf/max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
        if hasattr(model, "temp"):  # the contrastive models; the task-head models (VQA, NLVR2, SNLI-VE) have none
            metrics["train/temp"] = float(model.temp.detach().float().reshape(-1)[0])
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
        if isinstance(scale, (int, float)) and engine.fp16_enabled():
            metrics["train/loss_scale"] = float(scale)
        if torch.cuda.is_available():
            metrics["perf/max_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if window["flops"] and peak:
            compute = window["data"] + window["compute"]
            metrics["perf/mfu"] = window["flops"] / compute / peak if compute else 0.0
        logger.log(state["step"], metrics)
