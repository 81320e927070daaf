"""benchmarks/feature_baselines.py and unseen_classes.py: the feature variants, the hashes, and
the refusal to reuse a workdir or an evaluation of another config (issue 34)."""

import json
import sys

import numpy as np
import pytest
from conftest import REPO
from ml_collections import ConfigDict

from fdh_jax.training import code_fitting

sys.path.insert(0, str(REPO / "benchmarks"))

import feature_baselines as fb  # noqa: E402
import unseen_classes as uc  # noqa: E402


def test_variants_average_views_then_normalise():
    pools = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3) + 1
    old = fb.variant_features(pools, fb.OLD)
    np.testing.assert_array_equal(old, pools[:, 0, 0])
    both = fb.variant_features(pools, fb.Variant(mirror=True, pooling="mask", l2=True))
    mean = pools[:, :, 1].mean(1)
    np.testing.assert_allclose(both, mean / np.linalg.norm(mean, axis=1, keepdims=True))
    assert len(set(fb.VARIANTS)) == 8


def test_equal_terms_rows_and_cosine_map():
    rng = np.random.default_rng(0)
    centres = np.repeat(rng.standard_normal((6, 1, 1, 16)), 8, axis=0)
    pools = (centres + 0.3 * rng.standard_normal((48, 2, 2, 16))).astype(np.float32)
    labels = np.repeat(np.arange(6), 8)
    args = type("Args", (), {"seed": 0, "tie_break": "index"})()
    fits = {m: (m, pools, labels) for m in fb.METHODS}
    table = fb.score_variants(fits, pools, labels, pools, labels, [4], args)
    assert set(table) == {(m, v) for m in fb.METHODS for v in fb.VARIANTS}
    chosen = fb.equal_terms(table, "PCA-ITQ", mirror=True)
    assert chosen.mirror and chosen.l2
    features = fb.variant_features(pools, chosen)
    assert fb.cosine_map(features, features, labels, labels) > 0.9


def _flags(workdir, *extra):
    return [*uc.RECIPE, *extra, "--config.seed=0", f"--workdir={workdir}"]


def test_reused_workdir_must_hold_the_same_config(tmp_path):
    recorded = uc._config_dict(_flags(tmp_path, "--config.train.num_steps=800"))
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    uc.check_recorded_config(tmp_path, _flags(tmp_path, "--config.train.num_steps=800"))
    # Fields that do not change the model may differ.
    uc.check_recorded_config(
        tmp_path, _flags(tmp_path, "--config.train.num_steps=800", "--config.data.feature_cache=")
    )
    with pytest.raises(SystemExit, match="train.num_steps"):
        uc.check_recorded_config(tmp_path, _flags(tmp_path))
    # A field added since the run was recorded: no difference at its default value, ...
    del recorded["loss"]["instance_temperature"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    uc.check_recorded_config(tmp_path, _flags(tmp_path, "--config.train.num_steps=800"))
    # ... but one at another value changes the model.
    with pytest.raises(SystemExit, match="loss.instance_temperature"):
        uc.check_recorded_config(
            tmp_path,
            _flags(
                tmp_path, "--config.train.num_steps=800", "--config.loss.instance_temperature=0.3"
            ),
        )
    # Settings applied after training (the fitted codes) may differ: the run is resumed.
    del recorded["eval"]["fitted_codes"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    flags = _flags(
        tmp_path, "--config.train.num_steps=800", "--config.eval.fitted_code_tolerance=1"
    )
    uc.check_recorded_config(tmp_path, flags)


def test_a_finished_run_is_resumed_when_its_codes_were_fitted_otherwise(tmp_path):
    flags = _flags(tmp_path)
    wanted = code_fitting.settings(ConfigDict(uc._config_dict(flags)))
    assert uc._fit_is_stale({}, flags)  # scored with the heads' codes: fit them
    assert not uc._fit_is_stale({"fitted_codes": {"settings": wanted}}, flags)
    other = _flags(tmp_path, "--config.eval.fitted_code_tolerance=1")
    assert uc._fit_is_stale({"fitted_codes": {"settings": wanted}}, other)
    off = _flags(tmp_path, "--config.eval.fitted_codes=False")
    assert uc._fit_is_stale({"fitted_codes": {"settings": wanted}}, off)
    assert not uc._fit_is_stale({}, off)


def test_reused_evaluation_must_match(tmp_path):
    unseen = tmp_path / "unseen"
    path = tmp_path / "results.json"
    assert uc._stale_evaluation(path, 800, unseen) == "missing"
    codes = "PCA-ITQ fitted to the database's transfer features, descriptor weight 0.3"
    record = {"checkpoint_step": 800, "eval_data": str(unseen.resolve()), "codes": codes}
    path.write_text(json.dumps(record))
    assert uc._stale_evaluation(path, 800, unseen, codes) is None
    assert "step 800" in uc._stale_evaluation(path, 1600, unseen, codes)
    assert "weight 0.5" in uc._stale_evaluation(path, 800, unseen, codes.replace("0.3", "0.5"))
    assert "not" in uc._stale_evaluation(path, 800, tmp_path / "other", codes)
    # The heads' codes (no "codes" recorded) are not fitted codes, and the other way round.
    assert uc._stale_evaluation(path, 800, unseen) is not None
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "codes"}))
    assert uc._stale_evaluation(path, 800, unseen) is None
    fitted = {"fitted_codes": {"weight": 0.7}}
    assert "weight 0.7" in uc._stale_evaluation(path, 800, unseen, uc._codes_label(fitted))
