"""``maml-jax reproduce``: rows, budgets, the smoke table and resuming it."""

import json

import pytest

from maml_jax.app import cli, presets, reproduce


def test_rows_name_presets_and_paper_numbers():
    for name, row in reproduce.ROWS.items():
        assert row.preset in presets.PRESETS, name
        assert row.paper and row.paper_source
    paper = {name: row.paper for name, row in reproduce.ROWS.items()}
    assert paper["maml-omniglot-5w1s"] == "98.7 ± 0.4"
    assert paper["maml-miniimagenet-5w5s"] == "63.11 ± 0.92"


def test_budget_scales_steps_and_the_schedules_tied_to_them():
    scaled = reproduce.budget_overrides("reptile-omniglot-5w1s", 0.01)
    assert scaled == {"steps": 1000}
    scaled = reproduce.budget_overrides("protonet-omniglot-5w1s", 0.01)
    assert scaled == {"steps": 200, "outer_decay_every": 20}
    scaled = reproduce.budget_overrides("maml-plus-plus-omniglot-5w1s", 0.01)
    assert scaled == {"steps": 500, "msl_anneal_steps": 50}
    assert reproduce.budget_overrides("omniglot-5w1s", 1e-9) == {"steps": 1}


@pytest.mark.slow
def test_smoke_table_then_rerun_skips_and_resumes(
    omniglot_dir, dataset_cache, tmp_path, capsys
):
    out = tmp_path / "table"
    argv = [
        "reproduce",
        "--smoke",
        "--no-progress",
        "--omniglot-dir",
        str(omniglot_dir),
        "--out",
        str(out),
        "--rows",
        "maml-omniglot-5w1s",
        "maml-miniimagenet-5w1s",
    ]
    assert cli.main(argv) == 0
    entries = {e["row"]: e for e in json.loads((out / "results.json").read_text())}
    maml = entries["maml-omniglot-5w1s"]
    assert maml["status"] == "trained" and maml["trained_steps"] == 2
    assert 0 <= maml["test_accuracy"] <= 100 and maml["test_episodes"] == 10
    assert maml["paper"] == "98.7 ± 0.4" and "jax" in maml["versions"]
    skipped = entries["maml-miniimagenet-5w1s"]["status"]
    assert skipped == "skipped: no --miniimagenet-dir given"
    table = (out / "results.md").read_text()
    assert "| [maml-omniglot-5w1s](maml-omniglot-5w1s/learning_curve.png) |" in table
    assert (out / "maml-omniglot-5w1s" / "learning_curve.png").exists()
    assert (out / reproduce.CURVES_PNG).exists()

    # Finished rows are read back; a row without its test results resumes.
    (out / "maml-omniglot-5w1s" / "test_results.json").unlink()
    assert cli.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again[0]["status"] == "resumed" and again[0]["trained_steps"] == 2
    assert cli.main(argv) == 0
    assert json.loads((out / "results.json").read_text())[0]["status"] == (
        "finished before"
    )

    # Another budget on the same folder is refused, in one line.
    capsys.readouterr()
    argv = [a for a in argv if a != "--smoke"] + ["--budget", "0.5"]
    assert cli.main(argv) == 2
    assert "use the --budget it was started with" in capsys.readouterr().err
