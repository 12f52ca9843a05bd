"""What a training run needs around the method: its config, checkpoints, distributed ranks,
logging and reports, stopping and preemption, memory errors, profiling, and the policy with its
frozen reference."""
