"""The ground floor: what every package needs and nothing of one AKD run or one search.

Errors and the one line a user reads (``errors``), local files written atomically (``files``, ``atomicfs``),
storage anywhere Ray writes (``storage``), YAML read safely (``yamlfile``), metric names and what a run's metrics
mean (``metrics``, ``verdict``), every file name of a search folder and of a run's output (``layout``), and the one
fence around Ray Tune's and Optuna's internals (``internals``). ``base`` imports nothing of ``trainable``, ``search``
or ``results``, and never Ray; all three build on it.
"""
