"""The machinery of a training run, shared by projector training (vlmcache.align.train) and captioner training
(vlmcache.caption.train). Each module imports only those before it: tracking (TensorBoard, MLflow, W&B), options
(OptimConfig), schedule (the lr schedule), loop (LoopState, Optimisation, RunResult), checkpoint (safetensors I/O,
restore), folder (the run folder: refusals, lock, best/last, metrics log), epochs (Run and the epoch loop)."""
