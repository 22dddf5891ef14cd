"""Metric names: one flat schema, reported every epoch, read by the search, Parquet and the report."""

EPOCH = "epoch"
VAL_ACC = "val_acc"  # the selection metric where the task has labels
VAL_AGREEMENT = "val_agreement"  # share of the proxy set's validation half where student and teacher agree
# (trainable/proxy.py): the selection metric without labels
VAL_LOSS = "val_loss"  # cross-entropy on the validation split
LOSS_STUDENT = "loss_student"  # mean imitation loss over the epoch's student steps
LOSS_GENERATOR = "loss_generator"  # mean generator objective over the epoch's generator steps
STUDENT_PARAMS = "student_params"
TEACHER_PARAMS = "teacher_params"
PARAM_RATIO = "param_ratio"  # student_params / teacher_params
IMAGES_PER_S = "images_per_s"  # synthetic images through student+generator steps per second
LR_STUDENT = "lr_student"  # learning rates in effect during the epoch
LR_GENERATOR = "lr_generator"
LOSS_DISCRIMINATOR = "loss_discriminator"  # AVKD only: mean discriminator BCE over the epoch's D steps
FLOPS = "flops"  # the student's floating-point operations per image (one forward), counted once per run
TRAIN_THREADS = "threads"  # torch intra-op CPU threads the run trained with (a trial: its cpus_per_trial)
# How the epoch's generated images spread over the teacher's classes: the exponential of the entropy of the teacher's
# predicted-class histogram on them, i.e. the effective number of classes (K: all classes alike; 1: one class only).
# Far below K is a generator collapsed to a few classes (base/verdict.py).
GEN_CLASSES = "gen_classes"
GEN_COLLAPSED = "gen_collapsed"  # 1.0 where gen_classes is under the collapse bar (sqrt of the class count), else 0.0

EPOCH_METRICS = (EPOCH, VAL_ACC, VAL_AGREEMENT, VAL_LOSS, LOSS_STUDENT, LOSS_GENERATOR, STUDENT_PARAMS, TEACHER_PARAMS,
                 PARAM_RATIO, FLOPS, IMAGES_PER_S, LR_STUDENT, LR_GENERATOR, LOSS_DISCRIMINATOR, TRAIN_THREADS, GEN_CLASSES,
                 GEN_COLLAPSED)

# What the exported student costs to run, measured once on the CPU when a run finishes (final.json, best/).
LATENCY_MS = "latency_ms_b1"  # median milliseconds per image at batch 1
THROUGHPUT = "throughput_b256"  # median images per second at batch 256
SIZE_BYTES = "size_bytes"  # the torch.export program (student.pt2) on disk
THREADS = "cpu_threads"  # torch CPU threads during the timing
COST_METRICS = (FLOPS, LATENCY_MS, THROUGHPUT, SIZE_BYTES, THREADS)

# final.json of a run and best/metrics.json of a search share these keys.
TEST_ACC = "test_acc"  # held-out, computed once
TEST_AGREEMENT = "test_agreement"  # agreement on the proxy set's test half, computed once (selection: agreement)
SELECTED_ON = "selected_on"  # the metric the run or search selected on: val_acc or val_agreement
PROXY = "proxy"  # where the agreement's images came from (selection: agreement)
TEACHER_VAL_ACC = "teacher_val_acc"
TEACHER_TEST_ACC = "teacher_test_acc"
WALL_S = "wall_s"
# Did the distillation work? (base/verdict.py) The student's held-out accuracy as a share of the teacher's on the
# same images (its test agreement with the teacher where there are no labels), and the verdict on it.
TEACHER_SHARE = "teacher_share"
VERDICT = "verdict"  # "reached" (share >= the bar), "below" (with the likeliest cause), or "unknown"
VERDICT_CAUSE = "verdict_cause"  # below the bar: the likeliest cause and what to try, one line; otherwise null
VERDICT_KEYS = (TEACHER_SHARE, VERDICT, VERDICT_CAUSE)
# What the run computed in (trainable/speed.py): chosen by measurement where the config says auto.
PRECISION = "precision"  # fp32 | bf16
CHANNELS_LAST = "channels_last"  # true | false
SPEEDUP = "speedup_vs_fp32"  # measured: the chosen variant's speed over fp32 with contiguous tensors; null if not
SPEED_KEYS = (PRECISION, CHANNELS_LAST, SPEEDUP)
FINAL_METRICS = (VAL_ACC, TEST_ACC, VAL_AGREEMENT, TEST_AGREEMENT, SELECTED_ON, PROXY, TEACHER_VAL_ACC,
                 TEACHER_TEST_ACC, STUDENT_PARAMS, TEACHER_PARAMS, PARAM_RATIO, WALL_S, *COST_METRICS, *SPEED_KEYS, *VERDICT_KEYS)

# Reported once, instead of an epoch's metrics, by a run whose loss became NaN/Inf: divergence is a
# result of its settings (the trial ends, recorded with the reason), not a crash to retry.
DIVERGED = "diverged"  # 1.0
ERROR = "error"  # the reason, one line
