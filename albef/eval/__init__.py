"""Evaluation metrics and procedures (pure functions over model outputs)."""
