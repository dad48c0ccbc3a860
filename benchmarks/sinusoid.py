"""Sinusoid regression with MAML, the protocol of Finn et al. (2017), Section 5.1.

A thin entry point: the protocol lives in ``maml_jax.app.sinusoid`` so that
``maml-jax sinusoid`` (the installed command) runs exactly the same code.

Command: ``python benchmarks/sinusoid.py --out runs/sinusoid`` (70k steps, about
two minutes on a 2-core CPU); ``--smoke`` for a seconds-long run. Results: see
``benchmarks/README.md``.
"""

from maml_jax.app.sinusoid import main

if __name__ == "__main__":
    main()
