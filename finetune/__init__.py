"""Fine-tuning entrypoints, one thin script per task over the shared engine: ``python -m finetune.<task> CONFIG``."""
