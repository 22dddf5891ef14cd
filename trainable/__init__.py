"""One data-free adversarial distillation run in plain PyTorch: the task, the teacher, the student and the generator,
the step loop, its checkpoints and its outputs. Imports base/ only; ``tune_trainable`` is its one door to Ray."""
