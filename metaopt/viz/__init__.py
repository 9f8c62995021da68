"""Matplotlib figures that look inside learned optimizers: learned schedules, effective step
sizes and update distributions recorded from any ``torch.optim`` optimizer, a rule's response
surface, loss curves over seeds, speedups, sweep comparisons, and what a fast-weight layer writes within a sequence. Importing this package chooses no
matplotlib backend."""
from metaopt.viz.plots import (curves_from_rows, iqm, plot_effective_step_sizes, plot_eval_curves, plot_heldout,
                               plot_loss_curves, plot_lr_schedule, plot_meta_training,
                               plot_response_surface, plot_speedups, plot_sweep,
                               plot_update_distributions, read_heldout)
from metaopt.viz.fastweights import FastWeightTrace, fast_weight_trace, plot_fast_weights
from metaopt.viz.probe import ResponseSurface, response_surface
from metaopt.viz.record import StepLog, StepRecorder
from metaopt.viz.sweep import SweepRun, load_sweep

__all__ = ["curves_from_rows", "iqm", "plot_effective_step_sizes", "plot_eval_curves", "plot_heldout",
           "plot_loss_curves", "plot_lr_schedule", "plot_meta_training", "plot_response_surface",
           "plot_speedups", "plot_sweep", "plot_update_distributions", "read_heldout",
           "FastWeightTrace", "fast_weight_trace", "plot_fast_weights", "ResponseSurface", "response_surface", "StepLog", "StepRecorder", "SweepRun", "load_sweep"]
