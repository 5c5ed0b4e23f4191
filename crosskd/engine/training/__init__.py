"""Training: the `Trainer` (setup, epoch loop, step) and `DistillTrainer`, the run state they save and resume
(`run_state`), the optimiser, schedule and EMA, DDP and its torchrun launchers, the stop-signal and non-finite-step
guards, `torch.compile`, the progress line and the run log (results.csv, plots, TensorBoard)."""
