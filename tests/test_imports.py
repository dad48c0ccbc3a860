"""``import maml_jax`` stays light, and the library never imports the application."""

import subprocess
import sys

import maml_jax


def _python(code: str) -> str:
    """Runs ``code`` in a fresh interpreter (this one has imported everything)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_loads_neither_orbax_nor_matplotlib():
    code = (
        "import maml_jax, sys; "
        "print('orbax' in sys.modules, 'matplotlib' in sys.modules)"
    )
    assert _python(code) == "False False"


def test_import_loads_neither_equinox_nor_flax_nnx():
    # Equinox is an optional extra; both are imported by their adapters only.
    code = (
        "import maml_jax, sys; "
        "print('equinox' in sys.modules, 'flax.nnx' in sys.modules)"
    )
    assert _python(code) == "False False"


def test_checkpoint_names_are_still_public():
    from maml_jax import checkpoint

    for name in ("Checkpointer", "CorruptCheckpointError", "RestoredCheckpoint"):
        assert getattr(maml_jax, name) is getattr(checkpoint, name)
        assert name in maml_jax.__all__ and name in dir(maml_jax)
    assert set(maml_jax.__all__) <= set(dir(maml_jax))


def test_library_never_imports_the_app():
    # pkgutil.walk_packages would import maml_jax.app itself to list it.
    code = (
        "import importlib, pkgutil, sys\n"
        "def walk(package):\n"
        "    for m in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        if m.name != 'maml_jax.app':\n"
        "            module = importlib.import_module(m.name)\n"
        "            if m.ispkg:\n"
        "                walk(module)\n"
        "walk(importlib.import_module('maml_jax'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('maml_jax.app')))"
    )
    assert _python(code) == "[]"
