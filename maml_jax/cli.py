"""The ``maml-jax`` command line.

``maml-jax sinusoid [options]`` meta-trains MAML on the sinusoid protocol of the
MAML paper and writes results, a metrics log and a figure (``--help`` lists the
options).
"""

from __future__ import annotations

import sys

COMMANDS = {"sinusoid": "maml_jax.experiments.sinusoid"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        message = f"usage: maml-jax {{{names}}} [options]   (maml-jax NAME --help)"
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"maml-jax: unknown command {argv[0]!r}; choose from {names}.",
                file=sys.stderr,
            )
            print(message, file=sys.stderr)
            return 2
        print(message)
        return 0
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
