"""Codes fitted to a collection (`fdh_jax.search.adaptation`, `--mode=eval --adapt`): PCA-ITQ
against hand-made cases and NumPy references, the model's foreground-pooled C5, and the eval mode's
plumbing against features computed image by image."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from fdh_jax.config_checks import ConfigError, validate_config
from fdh_jax.data import load_split
from fdh_jax.data.transforms import eval_transform
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.fdh import FDHMFE
from fdh_jax.search import adaptation
from fdh_jax.search.hash_index import HashIndex
from fdh_jax.serving import indexing
from fdh_jax.serving.encoder import EncoderRequestError
from fdh_jax.serving.evaluate_workdir import evaluate_checkpoint
from fdh_jax.serving.export import export_encoder
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import train


def test_pca_keeps_the_directions_of_largest_variance():
    rng = np.random.default_rng(0)
    # Variances 25, 9, 1, 0.25 along a random orthogonal basis.
    basis, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    data = (rng.standard_normal((2000, 4)) * [5, 3, 1, 0.5]) @ basis.T
    centred = data - data.mean(0)
    projection = adaptation.pca_projection(centred, 2)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)  # independent of the SVD
    top = eigenvectors[:, np.argsort(eigenvalues)[::-1][:2]]
    # The same 2-D subspace: the projectors agree.
    np.testing.assert_allclose(projection @ projection.T, top @ top.T, atol=1e-8)
    with pytest.raises(ValueError, match="at most 4 directions"):
        adaptation.pca_projection(centred, 5)
    with pytest.raises(adaptation.CollectionTooSmallError, match="3 images for 8-bit codes"):
        adaptation.fit_pca_itq(data[:3], 8)


def test_itq_turns_rotated_clusters_into_one_code_each():
    # Four tight clusters at the corners (+-1, +-1) of the square, rotated by 45 degrees: the
    # signs of the principal coordinates split them 2-2-0 (two clusters straddle each axis);
    # ITQ must rotate back so that every cluster gets a code of its own.
    rng = np.random.default_rng(1)
    corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float64)
    labels = np.repeat(np.arange(4), 50)
    angle = np.pi / 4
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (corners[labels] + 0.05 * rng.standard_normal((200, 2))) @ turn.T
    fitted = adaptation.fit_pca_itq(points, 2, seed=0)
    codes = fitted(points)
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
    per_cluster = [np.unique(codes[labels == c], axis=0) for c in range(4)]
    assert all(len(u) == 1 for u in per_cluster)  # one code per cluster
    assert len({tuple(u[0]) for u in per_cluster}) == 4  # and four different codes
    rotation = np.linalg.lstsq(
        adaptation.pca_projection(points - points.mean(0), 2), fitted.projection, rcond=None
    )[0]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(2), atol=1e-8)  # orthogonal


def test_collection_hash_and_transfer_features_match_hand_computation():
    fitted = adaptation.CollectionHash(
        mean=np.array([1.0, 0.0, -1.0]), projection=np.array([[1.0, 0.0], [0.0, -1.0], [1, 1]])
    )
    features = np.array([[1.0, 2.0, -1.0], [3.0, 0.0, -3.0], [0.0, -1.0, 0.0]])
    # (x - mean) @ P, by hand: [0, -2], [0, -2], [0, 2] -> 0 maps to +1.
    np.testing.assert_array_equal(fitted(features), [[1, -1], [1, -1], [1, 1]])
    with pytest.raises(ValueError, match="3-dimensional"):
        fitted(np.zeros((2, 4)))

    pooled = np.array([[3.0, 4.0], [0.0, 2.0]])
    descriptor = np.array([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    expected = [[0.6, 0.8, 0.0, 0.0, 0.5], [0.0, 1.0, 0.5, 0.0, 0.0]]
    np.testing.assert_allclose(adaptation.transfer_features(pooled, descriptor, 0.5), expected)
    np.testing.assert_allclose(
        adaptation.transfer_features(pooled, descriptor, 0.0), [[0.6, 0.8], [0.0, 1.0]]
    )


def test_model_pools_c5_over_its_foreground_mask():
    rng = np.random.default_rng(2)
    maps = {
        "C3": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        "C4": rng.standard_normal((2, 4, 4, 6)).astype(np.float32),
        "C5": rng.standard_normal((2, 2, 2, 5)).astype(np.float32),
    }
    model = FDHMFE(num_classes=3, bits=(8,), node_dim=8, gnn_heads=2, gnn_layers=1)
    variables = model.init(jax.random.key(0), maps)
    outputs = model.apply(variables, maps)
    mask = np.asarray(outputs["mask"], np.float64)[..., 0]  # [B, 2, 2]
    expected = np.zeros((2, 5))
    for b in range(2):
        for c in range(5):
            total = sum(maps["C5"][b, i, j, c] * mask[b, i, j] for i in range(2) for j in range(2))
            expected[b, c] = total / mask[b].sum()
    np.testing.assert_allclose(np.asarray(outputs["pooled"]), expected, rtol=1e-5, atol=1e-6)

    plain = FDHMFE(num_classes=3, bits=(8,), node_dim=8, gnn_heads=2, use_suppression=False)
    outputs = plain.apply(plain.init(jax.random.key(0), maps), maps)
    np.testing.assert_allclose(outputs["pooled"], maps["C5"].mean((1, 2)), rtol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adapt")
    config = tiny_config(num_steps=2)
    train.train_and_evaluate(config, workdir)
    return config, workdir


def _features_one_by_one(encoder, config, split):
    """Transfer features of a split computed image by image, outside the batched path."""
    weight = adaptation.descriptor_weight(encoder.config)
    source = load_split(config, split)
    rows = []
    for i in range(len(source)):
        image = eval_transform(source[i]["image"], 32, 32)[None]
        out = encoder.model.apply(encoder.variables, jnp.asarray(image), train=False)
        rows.append((np.asarray(out["pooled"])[0], np.asarray(out["descriptor"])[0]))
    pooled, descriptor = (np.stack(r) for r in zip(*rows, strict=True))
    return adaptation.transfer_features(pooled, descriptor, weight), source


def test_adapted_evaluation_fits_the_database_and_scores_the_queries(trained):
    config, workdir = trained
    before = (workdir / "results.json").read_text()
    results = evaluate_checkpoint(workdir, adapt=True)
    assert (workdir / "results.json").read_text() == before  # the training results stay
    written = json.loads((workdir / "eval" / "train_adapted" / "results.json").read_text())
    assert written["mAP"] == results["mAP"] and "PCA-ITQ" in written["codes"]

    encoder = restore_encoder(workdir)
    assert adaptation.descriptor_weight(encoder.config) == adaptation.DESCRIPTOR_WEIGHT
    assert adaptation.descriptor_weight({"eval": {}}) == adaptation.DESCRIPTOR_WEIGHT  # older runs
    db, db_source = _features_one_by_one(encoder, config, "train")
    query, query_source = _features_one_by_one(encoder, config, "test")
    for k in config.bits:
        fitted = adaptation.fit_pca_itq(db, k, seed=0)
        expected = mean_average_precision(
            fitted(query), fitted(db), query_source.labels, db_source.labels
        )
        assert results["mAP"][str(k)] == pytest.approx(float(expected), abs=1e-6)


def test_adapted_index_keeps_its_fit_and_hashes_queries_through_it(trained, tmp_path):
    config, workdir = trained
    path = tmp_path / "adapted.npz"
    indexing.encode_to_index(workdir, path, split="train", bits=12, adapt=True)
    index = HashIndex.load(path)
    assert json.loads(index.encoder_json)["descriptor_weight"] == adaptation.DESCRIPTOR_WEIGHT

    encoder = restore_encoder(workdir)
    db, _ = _features_one_by_one(encoder, config, "train")
    fitted = adaptation.fit_pca_itq(db, 12, seed=0)
    np.testing.assert_array_equal(index.codes, fitted(db))
    np.testing.assert_allclose(index.code_projection, fitted.projection, rtol=1e-3, atol=1e-6)

    # A search hashes the queries with the index's fit, not with the heads.
    query, query_source = _features_one_by_one(encoder, config, "test")
    np.testing.assert_array_equal(encoder.index_query_codes(index, query_source), fitted(query))
    indexing.encode_to_index(workdir, tmp_path / "heads.npz", split="train", bits=12)
    heads_index = HashIndex.load(tmp_path / "heads.npz")
    assert heads_index.code_projection is None
    assert not np.array_equal(heads_index.codes, index.codes)

    # An export has only the heads' program: a clear refusal, nothing written.
    export = export_encoder(workdir, tmp_path / "export")
    with pytest.raises(EncoderRequestError, match="need the training workdir"):
        indexing.encode_to_index(export, tmp_path / "x.npz", split="train", adapt=True)
    assert not (tmp_path / "x.npz").exists()


def test_index_refuses_an_inconsistent_fit(tmp_path):
    codes = np.ones((2, 4), np.int8)
    with pytest.raises(ValueError, match="both code_mean and code_projection"):
        HashIndex(codes=codes, labels=[0, 1], paths=["a", "b"], code_mean=np.zeros(3))
    with pytest.raises(ValueError, match="does not map 3 features to 4 bits"):
        HashIndex(
            codes=codes,
            labels=[0, 1],
            paths=["a", "b"],
            code_mean=np.zeros(3),
            code_projection=np.zeros((3, 5)),
        )
    fitted = HashIndex(
        codes=codes,
        labels=[0, 1],
        paths=["a", "b"],
        code_mean=np.zeros(3),
        code_projection=np.ones((3, 4)),
    )
    fitted.save(tmp_path / "fitted.npz")
    loaded = HashIndex.load(tmp_path / "fitted.npz")
    np.testing.assert_array_equal(loaded.code_projection, np.ones((3, 4)))


def test_adapt_weight_is_validated(tiny):
    tiny.eval.adapt_descriptor_weight = -0.1
    with pytest.raises(ConfigError, match="eval.adapt_descriptor_weight"):
        validate_config(tiny, 1)
