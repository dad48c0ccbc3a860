"""The ``maml-jax`` application, built on the library and never imported by it.

Paper protocols as runnable experiments, with what a command line needs around
them: ``presets`` (the few-shot paper configurations and their validation),
``learners`` (each protocol's learner settings), ``runs`` (run folders,
exact resume, evaluation, stopping on a signal), ``sinusoid`` (the sinusoid
regression protocol), ``plots`` and ``cli``. Flags, exit codes and signals are
handled here, not in the library.
"""
