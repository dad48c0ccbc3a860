"""Paper protocols as runnable experiments (used by the CLI and ``benchmarks/``)."""
