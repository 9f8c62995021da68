"""Matplotlib figures: learned rate schedules, loss curves, sweep comparisons."""
from metaopt.viz.plots import plot_eval_curves, plot_lr_schedule, plot_meta_training

__all__ = ["plot_eval_curves", "plot_lr_schedule", "plot_meta_training"]
