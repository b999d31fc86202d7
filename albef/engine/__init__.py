"""The one training engine (DeepSpeed ZeRO) shared by pretraining and every fine-tuning task.

``Trainer(run_cfg, task).fit()`` owns distributed setup, DeepSpeed, the LR and alpha schedules, logging
(console, JSONL, W&B on rank 0), checkpoints with exact resume, signals and non-finite-loss handling. A task
(``albef.tasks``) owns only its model, data and per-batch loss.
"""
