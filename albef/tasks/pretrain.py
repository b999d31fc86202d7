"""Pretraining task (paper §3): ITC + ITM + MLM with momentum distillation, on image-text shards or official JSON.

    python -m pretrain.train pretrain/configs/4m.yaml
    python -m pretrain.train pretrain/configs/4m.yaml train.eval_every_steps=5000 \
        eval.retrieval_file=data/coco_val.json eval.image_root=coco/ eval.zeroshot_file=data/cls_val.json

Optional held-out evaluation during pretraining (split ``heldout``, every ``train.eval_every_steps`` steps and
``train.eval_every_epochs`` epochs, logged to metrics.jsonl and W&B as curves): zero-shot retrieval of
``eval.retrieval_file`` (the retrieval task's evaluation: ITC top ``eval.k_test`` re-ranked by ITM; ``txt_r1``,
``img_r1``, ``r_mean``, ITC-only recall, ITM's matched-vs-random accuracy) and zero-shot classification of
``eval.zeroshot_file`` (the zero-shot task's: ``zs_top1``, ``zs_top5``, ...). The best ``heldout/r_mean`` (else
``zs_top1``) marks the best checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List

from albef.data import DataConfig, build_pretrain_loader
from albef.engine.flops import pretrain_step_flops
from albef.engine.task import ITC_ITM_WARMUPS, RunConfig, Task


@dataclass
class PretrainEvalConfig:
    retrieval_file: str = ""  # held-out [{"image", "caption": [...]}] (COCO/Flickr val layout); "" = none
    zeroshot_file: str = ""  # held-out [{"image", "label"}] for zero-shot classification; "" = none
    image_root: str = ""  # what both files' image paths are relative to
    classes: List[str] = field(default_factory=list)  # zero-shot class names; [] = the sorted labels of the file
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}."])  # zero-shot prompts, one "{}" each
    k_test: int = 16  # retrieval candidates re-ranked by ITM per query
    image_batch_size: int = 64


@dataclass
class PretrainConfig(RunConfig):
    """The whole pretraining YAML. ``model`` may be a preset name (tiny, small, base) or a YAML path."""

    data: DataConfig = field(default_factory=DataConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)


class PretrainTask(Task):
    name = "pretrain"
    model_kind = "pretrain"
    train_warmups = ITC_ITM_WARMUPS
    config_cls = PretrainConfig

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        self._evaluators = []
        if cfg.eval.retrieval_file or cfg.eval.zeroshot_file:  # (otherwise the class's: none, or a subclass's own)
            self.eval_splits = ("heldout",)
            self.primary_metric = "r_mean" if cfg.eval.retrieval_file else "zs_top1"
            self._evaluators = self._build_evaluators()

    def _build_evaluators(self) -> list:
        """The retrieval and zero-shot tasks' own evaluations, configured from the ``eval`` section (evaluation
        only, results written under ``<output_dir>/heldout_eval``)."""
        from albef.tasks.retrieval import RetrievalConfig, RetrievalDataConfig, RetrievalEvalConfig, RetrievalTask
        from albef.tasks.zeroshot import ZeroShotConfig, ZeroShotDataConfig, ZeroShotEvalConfig, ZeroShotTask

        c, e = self.cfg, self.cfg.eval
        train = dataclasses.replace(c.train, evaluate_only=True, output_dir=f"{c.train.output_dir}/heldout_eval")
        out = []
        if e.retrieval_file:
            data = RetrievalDataConfig(
                test_file=e.retrieval_file,
                image_root=e.image_root,
                image_res=c.data.image_res,
                max_words=c.data.max_words,
                max_text_len=c.data.max_text_len,
                num_workers=0,
            )
            ev = RetrievalEvalConfig(k_test=e.k_test, image_batch_size=e.image_batch_size)
            out.append(("", RetrievalTask(RetrievalConfig(model=c.model, data=data, eval=ev, train=train))))
        if e.zeroshot_file:
            data = ZeroShotDataConfig(
                test_file=e.zeroshot_file,
                image_root=e.image_root,
                image_res=c.data.image_res,
                classes=list(e.classes),
                templates=list(e.templates),
                num_workers=0,
            )
            ev = ZeroShotEvalConfig(image_batch_size=e.image_batch_size)
            out.append(("zs_", ZeroShotTask(ZeroShotConfig(model=c.model, data=data, eval=ev, train=train))))
        return out

    def evaluate(self, model, split, device, dtype):
        results = {}
        for prefix, task in self._evaluators:
            results.update({prefix + k: v for k, v in task.evaluate(model, "test", device, dtype).items()})
            self.media.update(task.pop_media())
        return results

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        data = dataclasses.replace(self.cfg.data, batch_size=micro_batch_size)
        return build_pretrain_loader(data, tokenizer, rank=rank, world_size=world_size, seed=seed)

    def training_step(self, model, batch, progress):
        out = model(
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            alpha=progress.alpha,
            hard_negatives=progress.hard_negatives,
            use_queue=progress.use_queue,
            momentum=progress.momentum,
        )
        loss = self.cfg.train.mlm_weight * out["loss_mlm"] + out["loss_ita"] + out["loss_itm"]
        return loss, {k: v.detach() for k, v in out.items()}

    def step_flops(self, batch) -> float:
        mask = batch["attention_mask"]
        masked = 0.15 * float(mask[:, 1:].sum()) / mask.shape[0]
        return pretrain_step_flops(self.cfg.model, mask.shape[0], float(mask.sum()) / mask.shape[0], masked)
