"""Codes fitted at the end of training (`eval.fitted_codes`): the folded hash against a NumPy
PCA-ITQ of the blend, the choice of the weight, and a trained workdir whose evaluation,
encoders and export all emit the fitted codes."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from fdh_jax.common.checksums import variables_fingerprint
from fdh_jax.config_checks import ConfigError, validate_config
from fdh_jax.data import load_splits, validation_split
from fdh_jax.encoding import continuous_outputs
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.fitted_codes import FITTED, fitted_code, folded_hash
from fdh_jax.search.adaptation import fit_pca_itq, transfer_features
from fdh_jax.serving.export import export_encoder
from fdh_jax.serving.exported_encoder import load_export
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import code_fitting
from fdh_jax.training.train import train_and_evaluate
from fdh_jax.training.workdir import ModelFileError


def _blend_codes_numpy(pooled, head, weight, hashed):
    """The reference: the blend built and hashed in float64 by `adaptation`."""
    return hashed(transfer_features(pooled, head, weight))


def test_folded_hash_gives_the_codes_of_pca_itq_on_the_blend():
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((200, 24)) + 3 * rng.standard_normal((1, 24))
    head = rng.standard_normal((200, 8))
    weight = 0.7
    hashed = fit_pca_itq(transfer_features(pooled, head, weight), 8, seed=0)
    expected = _blend_codes_numpy(pooled, head, weight, hashed)
    folded = folded_hash(hashed.mean, hashed.projection, weight, pooled_dim=24)
    got = np.asarray(
        fitted_code(jax.tree.map(jnp.asarray, folded), jnp.asarray(pooled), jnp.asarray(head))
    )
    assert got.dtype == np.int8 and set(np.unique(got)) <= {-1, 1}
    # float32 against float64: only projections within rounding of 0 may flip.
    margin = np.abs((transfer_features(pooled, head, weight) - hashed.mean) @ hashed.projection)
    clear = margin > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], expected[clear])
    with pytest.raises(ValueError, match="no blend"):
        folded_hash(hashed.mean, hashed.projection, weight, pooled_dim=40)


def test_the_weight_is_the_smallest_within_the_tolerance_on_the_mean_over_lengths():
    table = {
        "heads": [0.80, 0.84],  # mean 0.82
        "w=0.3": [0.70, 0.86],  # mean 0.78: 4 points below
        "w=0.5": [0.79, 0.84],  # mean 0.815: 0.5 below, allowed
        "w=1": [0.82, 0.85],
    }
    assert code_fitting.choose_weight(table, 0.5) == 0.5
    assert code_fitting.choose_weight(table, 0.4) == 1.0
    assert code_fitting.choose_weight(table, 5.0) == 0.3
    assert code_fitting.choose_weight({"heads": [0.8], "w=1": [0.7]}, 0.5) is None


def test_fitted_codes_need_a_validation_split():
    config = tiny_config()
    config.eval.fitted_codes = True
    with pytest.raises(ConfigError, match="eval.validation_fraction"):
        validate_config(config, 1)
    config.eval.fitted_code_weights = (0.5, 0.0)
    config.eval.validation_fraction = 0.2
    with pytest.raises(ConfigError, match="fitted_code_weights"):
        validate_config(config, 1)


def _fitted_config():
    config = tiny_config(6)
    config.data.synthetic.train_per_class = 10
    config.eval.validation_fraction = 0.2
    config.eval.fitted_codes = True
    return config


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """A tiny run with fitted codes: `(config, workdir, results)`."""
    workdir = tmp_path_factory.mktemp("fitted") / "workdir"
    config = _fitted_config()
    return config, workdir, train_and_evaluate(config, workdir)


def test_a_run_fits_its_codes_and_every_encoder_emits_them(fitted_run, tmp_path):
    config, workdir, results = fitted_run
    report = results["fitted_codes"]
    weight = report["weight"]
    assert weight in config.eval.fitted_code_weights
    assert report["validation_mAP"]["heads"] == pytest.approx(
        [results["selected"]["validation_mAP"][str(k)] for k in config.bits]
    )
    assert code_fitting.fit_path(workdir, results["steps"]).is_file()

    # The reference: PCA-ITQ of the training images' blend in NumPy, applied to the database.
    encoder = restore_encoder(workdir)
    assert FITTED in encoder.variables and encoder.fit_report["weight"] == weight
    heads_only = {k: v for k, v in encoder.variables.items() if k != FITTED}
    assert encoder.fit_report["fingerprint"] == variables_fingerprint(heads_only)
    database = load_splits(config, ("train",))["train"]
    outputs = continuous_outputs(encoder.model, heads_only, database, config, encoder.mesh)
    kept, _ = validation_split(
        np.asarray(database.labels),
        config.eval.validation_fraction,
        config.eval.validation_seed,
    )
    codes = encoder.encode_source(database)
    for k in config.bits:
        blend = transfer_features(outputs["pooled"], outputs[f"hash_{k}"], weight)
        hashed = fit_pca_itq(blend[kept], k, seed=0)
        expected = hashed(blend)
        clear = np.abs((blend - hashed.mean) @ hashed.projection) > 1e-4
        np.testing.assert_array_equal(codes[str(k)][clear], expected[clear])
        # Not the heads' signs: the fit changed the codes.
        assert not np.array_equal(codes[str(k)], np.where(outputs[f"hash_{k}"] >= 0, 1, -1))

    # The reported mAP scores these codes.
    query = load_splits(config, ("test",))["test"]
    query_codes = encoder.encode_source(query)
    for k in map(str, config.bits):
        expected_map = mean_average_precision(
            query_codes[k], codes[k], np.asarray(query.labels), np.asarray(database.labels)
        )
        assert results["mAP"][k] == pytest.approx(float(expected_map), abs=1e-6)

    # An export carries the fit: the same codes without the model's code.
    exported = load_export(export_encoder(workdir, tmp_path / "export"))
    assert exported.fingerprint == encoder.fingerprint
    for k, value in exported.encode_source(database).items():
        np.testing.assert_array_equal(value, codes[k])


def test_a_rerun_reuses_the_fit_and_a_run_without_it_serves_the_heads(fitted_run, tmp_path):
    config, workdir, results = fitted_run
    copy = tmp_path / "workdir"
    shutil.copytree(workdir, copy)
    path = code_fitting.fit_path(copy, results["steps"])
    before = path.stat().st_mtime_ns
    again = train_and_evaluate(config, copy)
    assert path.stat().st_mtime_ns == before  # loaded, not fitted again
    assert again["mAP"] == results["mAP"]
    fitted_fingerprint = restore_encoder(copy).fingerprint

    # A fit made for other parameters: the encoder refuses it; training fits again.
    with np.load(path) as archive:
        stored = dict(archive)
    report = json.loads(str(stored["report"]))
    stored["report"] = np.array(json.dumps(report | {"fingerprint": "0" * 64}))
    np.savez(path, **stored)
    with pytest.raises(ModelFileError, match="other parameters"):
        restore_encoder(copy)
    assert train_and_evaluate(config, copy)["mAP"] == results["mAP"]
    assert restore_encoder(copy).fingerprint == fitted_fingerprint

    # A damaged fit: the encoder refuses it by name; training fits again.
    path.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="step_"):
        restore_encoder(copy)
    assert train_and_evaluate(config, copy)["mAP"] == results["mAP"]

    # Fitted codes turned off: the fit goes, the heads' codes are scored and served.
    config = config.copy_and_resolve_references()
    config.eval.fitted_codes = False
    heads = train_and_evaluate(config, copy)
    assert not path.exists() and "fitted_codes" not in heads
    encoder = restore_encoder(copy)
    assert FITTED not in encoder.variables and encoder.fingerprint != fitted_fingerprint
    json.loads((copy / "results.json").read_text())  # whole
