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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from albef.data.transforms import to_device
from albef.engine import checkpointing, dist, signals
from albef.engine.flops import measured_matmul_peak
from albef.engine.metrics import MetricsLogger
from albef.engine.optim import build_optimizer
from albef.engine.schedule import albef_lr, alpha_at, cosine_lr, momentum_at
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


@dataclass
class RunState:
    """What the loop advances: saved in every checkpoint (``train_state``) and restored on resume."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches drawn (seeds the next one's RNG)
    epoch: int = 0
    samples: int = 0
    nonfinite_total: int = 0  # skipped non-finite losses and gradients
    wandb_id: Optional[str] = None
    best: Optional[float] = None  # the best primary metric of the first evaluation split so far
    evaluated_step: Optional[int] = None  # the step of the last evaluation
    last_saved: Optional[int] = None  # the step of the last checkpoint

    @classmethod
    def restore(cls, saved: Dict) -> "RunState":
        """From a checkpoint's ``train_state`` (older checkpoints lack the optional fields)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class Window:
    """Sums over the micro-steps since the last metrics row."""

    loss: float = 0.0
    n: int = 0
    data: float = 0.0  # seconds waiting for the loader
    compute: float = 0.0  # seconds in forward, backward and the optimizer step
    flops: float = 0.0
    logs: Dict[str, float] = field(default_factory=dict)


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

    def _set_lr(self, step: int) -> float:
        t = self.train
        if t.schedule == "albef":
            lr = albef_lr(
                step, self.steps_per_epoch, t.epochs, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps, t.warmup_granularity
            )
        else:
            lr = cosine_lr(step, self.total_steps, t.lr, t.warmup_lr, t.min_lr, t.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------------------------------------------
    def fit(self) -> Dict:
        """Train (or, with ``train.evaluate_only``, only evaluate) and return the run summary."""
        self._start()
        if self.train.evaluate_only:
            return self._evaluate_only()
        self._build_engine_and_data()
        epoch_ended = self._restore()
        state, t_start, exit_code = self.state, time.time(), 0
        try:
            if epoch_ended and self._evaluates_after_epoch(state.epoch) and state.evaluated_step != state.step:
                self._evaluate()
            while state.step < self.total_steps:
                t_data = time.perf_counter()
                for batch in self.loader:
                    self.window.data += time.perf_counter() - t_data
                    if self._micro_step(batch):  # the last step is done
                        break
                    t_data = time.perf_counter()
                else:
                    state.epoch += 1
                    self.loader.set_epoch(state.epoch)
                    if self._evaluates_after_epoch(state.epoch):
                        self._evaluate()
            self._finish()
        except StopRequested:
            # every rank is here together: at a step boundary (the stop flag is all-reduced), or leaving an
            # evaluation (signals.until_stop); an export is rank 0's alone and comes after the final checkpoint
            if state.last_saved != state.step:
                self._checkpoint()
            exit_code = EXIT_REQUEUE
            log.warning(
                "checkpoint saved at step %d after signal %s; exiting with %d for requeue",
                state.step,
                signals.received(),
                EXIT_REQUEUE,
            )
        return self._summary(exit_code, time.time() - t_start)

    def _start(self) -> None:
        """Process group, run folder and config file, DeepSpeed settings, the model with its initial weights."""
        t = self.train
        self.env = env = dist.detect()
        self.device = dist.init(env, t.collective_timeout_s)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.run_dir = Path(t.output_dir)
        self.ckpt_root, self.resume_tag = self._resume_tag(self.run_dir / "checkpoints")
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            name = "config.yaml" if self.resume_tag is None else f"config.resume-{self.resume_tag}.yaml"
            (self.run_dir / name).write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=False))
        self.ds_cfg = ds_config_for(t.ds_config, t.micro_batch_size, t.global_batch_size, env.world_size)
        self.gas = self.ds_cfg["gradient_accumulation_steps"]
        self.task.check_batch_geometry(self.cfg.model, t.micro_batch_size * env.world_size)
        precision = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.half = next((dt for key, dt in precision.items() if self.ds_cfg.get(key, {}).get("enabled")), None)
        self.dtype = self.half or torch.float32
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = self.task.build_model()
        if self.resume_tag is None:
            self._init_weights(self.model)

    def _build_engine_and_data(self) -> None:
        """The DeepSpeed engine around the model and optimizer, the train loader and the step counts."""
        import deepspeed

        from albef.tokenizer import Tokenizer

        t, env, model, ds_cfg = self.train, self.env, self.model, self.ds_cfg
        momentum_fp32 = model.momentum_state_fp32() if self.half else None
        stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        if stage and env.world_size == 1 and env.is_main:
            log.info(
                f"{t.ds_config}: ZeRO stage {stage} partitions nothing at one process but still flattens the gradients "
                "and keeps a second float32 copy of the weights every step; a ds_configs/zero0_*.json is faster here "
                "(README, Benchmarks)"
            )
        optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps, check_finite=stage == 0)
        tag = self.resume_tag
        self.saved_world = checkpointing.saved_world_size(self.ckpt_root, tag) if tag else env.world_size
        if self.saved_world != env.world_size and checkpointing.is_partitioned(self.ckpt_root / tag):
            # another number of ranks: ZeRO's per-rank optimizer partitions are re-cut by DeepSpeed's universal
            # checkpoint, which the engine must be told about when it is built
            checkpointing.prepare_universal(self.ckpt_root, tag, env.rank)
            ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
        if self.half:
            model.keep_momentum_fp32(momentum_fp32)
        self.engine.train()
        self.loader = self.task.build_train_loader(Tokenizer(), env.rank, env.world_size, t.micro_batch_size, t.seed)
        self.steps_per_epoch = len(self.loader) // self.gas
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"one epoch holds {len(self.loader)} micro-batches per rank, fewer than one optimizer "
                f"step ({self.gas} micro-batches): add data or lower train.global_batch_size"
            )
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        # A skipped micro-step or optimizer step changes no state: what the forward pass mutates (momentum encoders,
        # queues, queue pointer: the frozen parameters and the buffers) is copied before each micro-step, and before
        # each optimizer step's first micro-step, and put back when the micro-step or the step is skipped.
        self.before_micro = [torch.empty_like(x) for x in self._forward_state()]
        self.before_step = [torch.empty_like(x) for x in self._forward_state()] if self.gas > 1 else self.before_micro
        self.window_micro = 0  # good micro-steps so far in this optimizer step
        self.nonfinite_run = 0  # non-finite losses / gradients in a row
        self.window = Window()

    def _restore(self) -> bool:
        """The run state, weights and data position of the checkpoint to resume (if any), then the metrics logger.
        Returns whether the checkpoint was taken on an epoch's last batch: that epoch is over, and its end-of-epoch
        evaluation may still be due."""
        env, tag = self.env, self.resume_tag
        self.state = state = RunState()
        if tag is not None:
            client, rank_state = checkpointing.load(self.engine, self.ckpt_root, tag, env.rank, self.model)
            if self.half:  # the checkpoint holds the momentum weights in float32; DeepSpeed's load may have cast them
                self.model.keep_momentum_fp32(client["momentum_fp32"])
            self.state = state = RunState.restore(client["train_state"])
            if rank_state is not None:
                self.loader.load_state_dict(rank_state["loader"])
            else:
                self._resume_data_on_new_world(self.loader, self.ckpt_root / tag, self.saved_world, env.rank)
            log.info(
                "resumed from %s at step %d (written by %d ranks, now %d)",
                self.ckpt_root / tag,
                state.step,
                self.saved_world,
                env.world_size,
            )
            best = self.ckpt_root / checkpointing.BEST  # the best score's one owner (a checkpoint may predate it)
            if best.is_file() and self.task.eval_splits:
                state.best = json.loads(best.read_text())["metrics"].get(self._primary_key(), state.best)
        else:
            self.loader.set_epoch(0)
        epoch_ended = self.loader.epoch > state.epoch
        state.epoch = self.loader.epoch
        self.logger = MetricsLogger(
            self.run_dir, self.cfg.wandb, asdict(self.cfg), env.is_main, self.total_steps, state.step, state.wandb_id
        )
        state.wandb_id = self.logger.wandb_id
        self.peak = self.train.peak_tflops * 1e12 or measured_matmul_peak(self.dtype, self.device)
        signals.install()  # (again: entrypoints install it first thing; Trainer may also be used directly)
        return epoch_ended

    def _micro_step(self, batch: Dict) -> bool:
        """One micro-batch: the forward pass, then backward and the engine's step unless the loss is non-finite on
        some rank; at an optimizer-step boundary, ``_after_step``. Returns True once the last step is done."""
        t, state, engine = self.train, self.state, self.engine
        t_compute = time.perf_counter()
        torch.manual_seed(step_seed(t.seed, self.env.rank, state.micro_step))
        state.micro_step += 1
        batch = {k: to_device(v, self.device, self.dtype) for k, v in batch.items()}
        lr = self._set_lr(state.step)
        alpha = alpha_at(state.step, self.steps_per_epoch, t.alpha, t.alpha_warmup_epochs)
        progress = Progress(
            state.step,
            state.epoch,
            alpha,
            hard_negatives=state.step >= t.itm_random_negative_steps,
            use_queue=state.step >= t.queue_start_step,
            momentum=momentum_at(state.step, self.cfg.model.momentum, t.momentum_start, t.momentum_warmup_steps),
        )
        if self.window_micro == 0 and self.gas > 1:
            torch._foreach_copy_(self.before_step, self._forward_state())
        torch._foreach_copy_(self.before_micro, self._forward_state())
        loss, logs = self.task.training_step(engine, batch, progress)
        nonfinite, stop = dist.any_over_ranks(not math.isfinite(loss.item()), signals.received() is not None)
        if nonfinite:
            torch._foreach_copy_(self._forward_state(), self.before_micro)
            self._nonfinite("loss")
        else:
            self._backward_and_step(loss)
            w = self.window
            w.loss += loss.item()
            for k, v in logs.items():
                w.logs[k] = w.logs.get(k, 0.0) + float(v)
            w.n += 1
            w.flops += self.task.step_flops(batch)
        self.window.compute += time.perf_counter() - t_compute
        if engine.global_steps == state.step:  # within an optimizer step (gradient accumulation), or skipped
            return False
        return self._after_step(loss.item(), lr, alpha, stop)

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        engine = self.engine
        engine.backward(loss)
        skipped = engine.skipped_steps
        engine.step()
        self.window_micro += 1
        if engine.global_steps > self.state.step:  # an optimizer step boundary
            self.window_micro = 0
            if engine.skipped_steps > skipped:  # non-finite gradients (fp16: loss-scale overflow)
                torch._foreach_copy_(self._forward_state(), self.before_step)
                if not engine.fp16_enabled():
                    self._nonfinite("gradients")
            else:
                self.nonfinite_run = 0

    def _after_step(self, loss: float, lr: float, alpha: float, stop: bool) -> bool:
        """After an optimizer step: count it, log, stop on a signal, checkpoint and evaluate when due."""
        t, state = self.train, self.state
        state.step = self.engine.global_steps
        state.samples += t.global_batch_size
        self.logger.advance(1, {"loss": loss, "lr": lr})
        if state.step % t.log_every == 0 or state.step == self.total_steps:
            self._log(lr, alpha)
            self.window = Window()
        if stop:
            raise StopRequested()
        if t.save_every and state.step % t.save_every == 0:
            self._checkpoint()
        due = t.eval_every_steps and state.step % t.eval_every_steps == 0 and state.step < self.total_steps
        if due and self.task.eval_splits:
            self._evaluate()
        return state.step >= self.total_steps

    def _finish(self) -> None:
        """The planned steps are done: the last evaluation and checkpoint, then rank 0 exports the weights."""
        state = self.state
        if self.task.eval_splits and state.evaluated_step != state.step:
            self._evaluate()
        if state.last_saved != state.step:
            self._checkpoint()
        if self.train.export_final and self.env.is_main:
            best = checkpointing.best_tag(self.ckpt_root)
            for name, tag in (("final.pth", None), ("best.pth", best)) if best else (("final.pth", None),):
                if signals.received() is not None:  # the checkpoint is saved: a rerun exports
                    raise StopRequested()
                checkpointing.export_official_file(self.run_dir, self.run_dir / name, tag)

    def _summary(self, exit_code: int, elapsed: float) -> Dict:
        state = self.state
        summary = {
            "exit_code": exit_code,
            "steps": state.step,
            "total_steps": self.total_steps,
            "samples": state.samples,
            "epochs_completed": round(state.step / self.steps_per_epoch, 3),
            "train_seconds": round(elapsed, 2),
            "nonfinite_skipped": state.nonfinite_total,
            "data": self.loader.stats(),  # samples delivered (resumes included) and skipped, by reason
            "wandb_id": state.wandb_id,
        }
        self.logger.summary(summary)
        self.logger.close()
        if self.env.is_main:
            print("run summary: " + json.dumps(summary), flush=True)
        return summary

    def _checkpoint(self) -> None:
        client = {"train_state": asdict(self.state)}
        if self.half:
            client["momentum_fp32"] = self.model.momentum_state_fp32()
        checkpointing.save(
            self.engine,
            self.ckpt_root,
            self.state.step,
            client,
            {"loader": self.loader.state_dict()},
            self.env.rank,
            self.train.keep_last,
        )
        self.state.last_saved = self.state.step

    def _primary_key(self) -> str:
        return f"{self.task.eval_splits[0]}/{self.task.primary_metric}"

    def _evaluates_after_epoch(self, epoch: int) -> bool:
        return bool(self.task.eval_splits) and epoch % self.train.eval_every_epochs == 0

    def _evaluate(self) -> None:
        """Evaluate every split, log the results, and checkpoint and mark a new best primary metric."""
        state = self.state
        results = self._run_eval(self.model, self.device, self.dtype)
        state.evaluated_step = state.step
        if not results:
            return
        self.logger.log(state.step, results, media=self.task.pop_media())
        key = self._primary_key()
        if key in results and (state.best is None or results[key] > state.best):
            state.best = results[key]
            self._checkpoint()
            if self.env.is_main:
                checkpointing.mark_best(self.ckpt_root, checkpointing.tag_for(state.step), results)

    def _forward_state(self) -> List[torch.Tensor]:
        return [p.data for p in self.model.parameters() if not p.requires_grad] + list(self.model.buffers())

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_run += 1
        self.state.nonfinite_total += 1
        log.warning(
            "non-finite %s at step %d (%d in a row): skipped, no state changed",
            what,
            self.state.step,
            self.nonfinite_run,
        )
        if self.nonfinite_run >= self.train.max_nonfinite_steps:
            raise FloatingPointError(f"{self.nonfinite_run} non-finite losses in a row (train.max_nonfinite_steps)")

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

    def _evaluate_only(self) -> Dict:
        env, run_dir = self.env, self.run_dir
        if not self.cfg.init.checkpoint:
            log.warning("train.evaluate_only without init.checkpoint: evaluating randomly initialised weights")
        self.model.to(device=self.device, dtype=self.dtype)
        try:
            results = self._run_eval(self.model, self.device, self.dtype)
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

    def _log(self, lr: float, alpha: float) -> None:
        """One metrics row: the window's means, the run's counters, speed and memory."""
        engine, model, state, window, peak = self.engine, self.model, self.state, self.window, self.peak
        n = max(1, window.n)
        step_time = (window.data + window.compute) / max(1, n) * engine.gradient_accumulation_steps()
        metrics = {f"train/{k}": v / n for k, v in window.logs.items()}
        metrics.update(
            {
                "train/loss": window.loss / n,
                "train/lr": lr,
                "train/alpha": alpha,
                "train/epoch": state.epoch,
                "train/samples": state.samples,
                "perf/samples_per_s": self.train.global_batch_size / step_time if step_time else 0.0,
                "time/data_s": window.data / n,
                "time/compute_s": window.compute / n,
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
        if window.flops and peak:
            compute = window.data + window.compute
            metrics["perf/mfu"] = window.flops / compute / peak if compute else 0.0
        self.logger.log(state.step, metrics)
