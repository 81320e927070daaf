"""Command-line config mistakes (issue 11): one line on stderr naming the field, exit status 2.

ml_collections turns an unknown `--config.` field into a 55-line traceback and absl ends a value
of the wrong type with two lines and status 1; `fdh_jax.main` parses its flags itself to say it
in one line, with the closest known fields.
"""

import subprocess
import sys

import pytest
from conftest import REPO


def run_cli(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fdh_jax.main",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'w'}",
            *arguments,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "argument, expected",
    [
        (
            "--config.train.num_step=3",  # a typo
            "fdh_jax: error: --config.train.num_step: no such config field; did you mean "
            "train.num_steps, train.num_epochs, train.warmup_steps? (fields of train: ",
        ),
        (
            "--config.data.no_such=1",  # a field of a newer version, say
            "fdh_jax: error: --config.data.no_such: no such config field; did you mean "
            "data.crop_scale? (fields of data: bad_images, cached_views, crop_scale, ",
        ),
        (
            "--config.trian.num_steps=3",  # a misspelled section
            "fdh_jax: error: --config.trian.num_steps: no such config field; did you mean "
            "train.num_steps",
        ),
        (
            "--noconfig.model.use_gn",  # the boolean form
            "fdh_jax: error: --config.model.use_gn: no such config field; did you mean "
            "model.use_gnn",
        ),
        (
            "--config.data.root.x=1",  # below a value
            "fdh_jax: error: --config.data.root.x: no such config field; did you mean data.root? "
            "(data.root is a value, not a section)",
        ),
    ],
)
def test_unknown_config_field_is_one_line_with_a_suggestion(tmp_path, argument, expected):
    result = run_cli(tmp_path, argument)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(expected), lines[0]
    assert not (tmp_path / "w").exists()  # stopped while parsing flags


def test_value_of_the_wrong_type_is_one_line(tmp_path):
    result = run_cli(tmp_path, "--config.train.num_steps=abc")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "fdh_jax: error: flag --config.train.num_steps=abc: invalid literal for int() with base "
        "10: 'abc'"
    ]


def test_known_fields_still_override(tmp_path):
    """The hook changes errors only: a valid override reaches the config (here: validation)."""
    result = run_cli(tmp_path, "--config.train.num_steps=3", "--config.model.backbone=resnet7")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fdh_jax: error: config.model.backbone: unknown backbone")
