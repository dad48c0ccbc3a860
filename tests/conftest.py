"""Test configuration: float64 for gradient checks, strict rank promotion."""

import os
from pathlib import Path

# Set before jax starts its backend, and inherited by the processes the tests
# start. The suite compiles many hundreds of programs and runs each a few times,
# and LLVM's optimisation passes are most of XLA:CPU's compile time: the tests
# compile without them (the same operations, less optimised machine code; the
# benchmarks and users' programs compile with them).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        filter(
            None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]
        )
    )

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Measuring task batching compiles every candidate chunk size: only
# test_autotune.py does it (and the processes the tests start inherit this).
os.environ["MAML_JAX_AUTOTUNE"] = "0"


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drops compiled programs after each test module.

    The suite compiles many hundreds of programs in one process; keeping them
    all grows the process for nothing (each module's programs are its own),
    and XLA:CPU once crashed compiling late in a full run.
    """
    yield
    jax.clear_caches()


@pytest.fixture
def key():
    return jax.random.key(0)


OMNIGLOT_DIR = Path(
    os.environ.get("MAML_JAX_OMNIGLOT_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
)


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The folder with the real Omniglot archives (a failure under CI=true)."""
    for name in ("images_background.zip", "images_evaluation.zip"):
        if not (OMNIGLOT_DIR / name).is_file():
            message = (
                f"Omniglot archive {OMNIGLOT_DIR / name} is missing; set "
                f"MAML_JAX_OMNIGLOT_DIR to the folder holding the Omniglot zips."
            )
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
    return OMNIGLOT_DIR


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory) -> Path:
    """A session-wide dataset cache, so tests never write to the user's cache."""
    path = tmp_path_factory.mktemp("maml_jax_cache")
    os.environ["MAML_JAX_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> Path:
    """A persistent XLA compilation cache for the whole session: this process, the
    other pytest-xdist worker and the ``maml-jax`` processes the tests start.

    Killed and resumed runs, and the CLI tests' runs of one small configuration,
    compile the same programs. Programs that compile in under a second are not
    cached in this process (jax's default threshold); child processes cache
    everything.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, shared by the workers
    path = base / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return path
