"""Every script in examples/ runs its --smoke mode and prints a final loss.

Scripts that take ``--data-dir`` (Omniglot examples) get the shared Omniglot
folder, as every test that needs real data does (missing: a skip, or under
``CI=true`` a failure), and the session's dataset cache, so that the archives
are decoded once for all of them.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {
        "plain_function_model.py",
        "equinox_mlp.py",
        "linen_batchnorm_cnn.py",
        "nnx_batchnorm_cnn.py",
        "shard_map_train_step.py",
    } <= names


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_smoke(script, request):
    args = [sys.executable, str(script), "--smoke"]
    if "--data-dir" in script.read_text():
        omniglot_dir = request.getfixturevalue("omniglot_dir")
        request.getfixturevalue("dataset_cache")  # sets MAML_JAX_CACHE_DIR
        args += ["--data-dir", str(omniglot_dir)]
    # The script's folder, not the repository, heads sys.path: point it at this
    # checkout's maml_jax rather than whichever one is installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"^final loss: (\S+)$", done.stdout, flags=re.MULTILINE)
    assert found, done.stdout
    assert math.isfinite(float(found[-1]))
