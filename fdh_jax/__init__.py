"""fdh_jax: FDH-MFE fine-grained deep hashing in JAX/Flax, as a functional library.

    import fdh_jax
    model = fdh_jax.build_model(config, num_classes)         # a Flax Linen module
    variables = fdh_jax.init_variables(model, seed=0, image_size=224)
    outputs = model.apply(variables, images)                   # continuous codes, logits, ...
    codes = fdh_jax.encode(model, variables, images)           # {"48": int8 [B, 48] in {-1, +1}}
    fdh_jax.mean_average_precision(query_codes, db_codes, query_labels, db_labels)
    fdh_jax.train_and_evaluate(config, workdir)
    encoder = fdh_jax.load_encoder(workdir_or_export_dir)      # a trained model on its own
    codes = encoder.encode_images(["a.jpg", "b.jpg"])
    photos = fdh_jax.open_collection("birds/", encoder=encoder, create=True)  # add, remove, search
    hash_fn = fdh_jax.fit_pca_itq(fdh_jax.transfer_features(pooled, z, 0.3), bits=48)  # new classes

Re-exports only; each name lives in the module named for what it is (docs/design.md, "Module
map"): `models/`, `data/`, `search/` (codes, exact search, indexes), `encoding.py` (running a
model over a source), `evaluation/`, `training/`, `serving/` (trained encoders, export). The
names are imported on first use, so that `fdh_jax.load_encoder(export_dir)` needs only jax,
numpy and Pillow (no Flax, no model code): see `fdh_jax/serving/exported_encoder.py`.
"""

from fdh_jax.common.lazy import lazy_exports

_EXPORTS = {
    "FDHMFE": "fdh_jax.models.fdh",
    "binarize": "fdh_jax.models.fdh",
    "build_model": "fdh_jax.models.fdh",
    "init_variables": "fdh_jax.models.fdh",
    "get_backbone": "fdh_jax.models.backbones",
    "load_config": "fdh_jax.config_files",
    "load_split": "fdh_jax.data",
    "make_source": "fdh_jax.data",
    "encode": "fdh_jax.encoding",
    "fit_pca_itq": "fdh_jax.search.adaptation",
    "transfer_features": "fdh_jax.search.adaptation",
    "hamming_topk": "fdh_jax.search.scan",
    "HashIndex": "fdh_jax.search.hash_index",
    "MultiIndexHashing": "fdh_jax.search.multi_index",
    "Collection": "fdh_jax.search.collection",
    "open_collection": "fdh_jax.search.collection",
    "mean_average_precision": "fdh_jax.evaluation.metrics",
    "train_and_evaluate": "fdh_jax.training.train",
    "evaluate_checkpoint": "fdh_jax.serving.evaluate_workdir",
    "load_encoder": "fdh_jax.serving.load",
    "export_encoder": "fdh_jax.serving.export",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
