"""A trained FDH-MFE encoder: images -> binary codes of every trained length, indexes, search.

    import fdh_jax
    encoder = fdh_jax.load_encoder("/tmp/fdh_cub100")      # a training workdir
    encoder = fdh_jax.load_encoder("/tmp/cub100_encoder")  # a `--mode=export` directory
    codes = encoder.encode_images(["a.jpg", "b.jpg"])      # {"48": int8 [2, 48] in {-1, +1}, ...}

`Encoder` holds what both kinds share: input checks, the code lengths, the encoder's identity,
indexes and search. `WorkdirEncoder` (`workdir_encoder.py`) runs the Flax model restored from a
training workdir; `ExportedEncoder` (`exported_encoder.py`) the `jax.export` program. Both encode
in batches of the training config's `eval.batch_size`, so the same image gives the same code
through either and through `--mode=encode`.

**Identity.** `encoder.identity` is the parameter fingerprint (SHA-256 over every variable's
name, dtype, shape and bytes), the checkpoint step, the code lengths and the preprocessing. Hash
indexes record it, and a search refuses codes from an encoder with another identity.

This module imports no Flax and no model code (NumPy, Pillow, and JAX through
`fdh_jax.search`), so that loading an export stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fdh_jax.data.decode import decode_image
from fdh_jax.data.transforms import eval_crop
from fdh_jax.search import adaptation
from fdh_jax.search.adaptation import CollectionHash
from fdh_jax.search.hash_index import HashIndex
from fdh_jax.training.workdir import ModelFileError


class EncoderRequestError(ValueError):
    """A request the encoder cannot serve: a code length it was not trained for, bad input."""


class _ImageInput:
    """`encode_images`' input as a source: items `{"image": uint8 [H, W, 3], "label": -1}`."""

    def __init__(self, images: Any):
        if isinstance(images, (str, os.PathLike)):
            raise TypeError(
                "images must be a list of image paths or a uint8 array [N, H, W, 3], got one "
                f"path ({images!s}); wrap it in a list"
            )
        if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
            array = np.asarray(images)
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(
                    f"images as an array must be uint8 [N, H, W, 3], got {array.dtype} "
                    f"{array.shape}"
                )
            self._items = list(array)
        else:
            self._items = list(images)
            for item in self._items:
                if isinstance(item, np.ndarray):
                    if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
                        raise ValueError(
                            f"each image array must be uint8 [H, W, 3], got {item.dtype} "
                            f"{item.shape}"
                        )
                elif not isinstance(item, (str, os.PathLike)):
                    raise TypeError(
                        f"images must be image paths or uint8 [H, W, 3] arrays, got {type(item)}"
                    )
        self.paths = [str(i) if isinstance(i, (str, os.PathLike)) else "" for i in self._items]
        self.labels = np.full(len(self._items), -1, np.int32)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        item = self._items[index]
        image = item if isinstance(item, np.ndarray) else decode_image(os.fspath(item))
        return {"image": image, "label": -1}


class Encoder:
    """A trained FDH-MFE encoder: images -> binary codes of every trained length.

    Attributes: `bits` (the code lengths), `step` (the checkpoint), `fingerprint`,
    `preprocessing`, `class_names`, `training_config` (the training config as a dict).
    """

    def __init__(self, description: dict, training_config: dict, step: int, fingerprint: str):
        self.description = description
        self.training_config = training_config
        self.step = int(step)
        self.fingerprint = fingerprint
        self.preprocessing = description["preprocessing"]
        self.class_names = list(description.get("class_names", []))
        self.batch_size = int(training_config["eval"]["batch_size"])
        self.source_path: str | None = None  # set by `load_encoder`

    @property
    def bits(self) -> tuple[int, ...]:
        """The code lengths this encoder produces."""
        return tuple(int(k) for k in self.description["bits"])

    @property
    def identity(self) -> dict:
        """What makes two encoders' codes comparable: parameters, step, lengths, preprocessing."""
        return {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "bits": list(self.bits),
            "preprocessing": self.preprocessing,
            "backbone": self.description["backbone"],
        }

    def encode_images(
        self, images: Any, bits: int | None = None, *, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Binary codes of images, through the evaluation transform, in batches.

        `images`: a list of image file paths (decoded with Pillow; an unreadable file raises
        `BadImageError` naming it), a list of uint8 `[H, W, 3]` arrays, or a uint8 array
        `[N, H, W, 3]`; any size. Returns `{"K": int8 [N, K] in {-1, +1}}` for every length, or
        for `bits` only. `batch_size`: the encoding batch (default the training config's
        `eval.batch_size`); a small batch for a few images wastes no work on padding, and the
        codes are the same (each image's code depends on that image only).
        """
        if bits is not None and int(bits) not in self.bits:
            raise EncoderRequestError(f"bits={bits}: this encoder has code lengths {self.bits}")
        source = _ImageInput(images)
        if len(source) == 0:
            codes = {str(k): np.zeros((0, k), np.int8) for k in self.bits}
        else:
            codes = self.encode_source(source, batch_size)
        return codes if bits is None else {str(bits): codes[str(bits)]}

    def encode_source(self, source: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Codes of every item of a source (items with a uint8 `"image"`), in source order, in
        batches of `batch_size` (default `eval.batch_size`)."""
        raise NotImplementedError

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The evaluation transform of one uint8 `[H, W, 3]` photo up to its normalisation
        (resize, centre crop): the uint8 `[S, S, 3]` pixels `encode_prepared` takes."""
        size = int(self.preprocessing["image_size"])
        return eval_crop(image, size, int(self.preprocessing["eval_resize"]))

    def encode_prepared(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Codes of a batch of `prepare`d photos (uint8 `[B, S, S, 3]`) in one call of the
        model, with no input pipeline around it: `{"K": int8 [B, K]}`, the codes
        `encode_images` gives the same photos (the normalisation is `normalize`'s values, looked
        up: `fdh_jax.data.transforms.NORMALIZED`). Each batch size compiles once: a server
        keeps to a few sizes (`fdh_jax.serving.service.EncodeBatcher`)."""
        raise NotImplementedError

    def on_local_devices(self) -> Encoder:
        """This encoder on this process's devices only, for a multi-process run whose processes
        each encode photos of their own (a multi-process `--mode=add`): the same identity and
        codes, no collective. Itself where it is so already (one process, an export)."""
        return self

    def build_index(
        self, paths: Any, bits: int | None = None, labels: Any = None, *, adapt: bool = False
    ):
        """A `fdh_jax.search.HashIndex` of the images at `paths`, `bits`-bit codes (default:
        the longest), that remembers this encoder (see `identity`). `adapt`: codes fitted to
        these images without labels (`fdh_jax.search.adaptation`), for classes the model never
        trained on; needs a training workdir."""
        paths = [os.fspath(p) for p in paths]
        k = str(max(self.bits) if bits is None else bits)
        if adapt:
            return self.index_fitted(_ImageInput(paths), paths, int(k), labels)
        return self.index_codes(self.encode_images(paths, int(k))[k], paths, labels)

    def transfer_features(self, source: Any, descriptor_weight: float) -> np.ndarray:
        """`fdh_jax.search.adaptation.transfer_features` of every item of `source`: `[N, F]`."""
        raise EncoderRequestError(
            "codes fitted to a collection (--adapt) need the training workdir: an export holds "
            "only the hash heads' program"
        )

    def index_fitted(self, source: Any, paths: Sequence[str], bits: int, labels: Any = None):
        """A `HashIndex` of codes fitted to `source` (PCA-ITQ on its transfer features, no
        labels; `fdh_jax.search.adaptation`): the index keeps the fit, which its queries go
        through."""
        if int(bits) not in self.bits:
            raise EncoderRequestError(f"bits={bits}: this encoder has code lengths {self.bits}")
        weight = adaptation.descriptor_weight(self.training_config)
        # An export refuses here, before any work; too few images, in the fit.
        features = self.transfer_features(source, weight)
        fitted = adaptation.fit_pca_itq(features, int(bits), seed=0)
        index = self.index_codes(fitted(features), paths, labels)
        identity = json.loads(index.encoder_json) | {
            "codes": "fitted to the collection (fdh_jax.search.adaptation)",
            "descriptor_weight": weight,
        }
        index.encoder_json = json.dumps(identity)
        index.code_mean, index.code_projection = fitted.mean, fitted.projection
        return index

    def index_query_codes(self, index: Any, source: Any) -> np.ndarray:
        """Codes of `source` comparable with `index`'s: the hash heads', or the index's own fit
        applied to the transfer features for an index made with `adapt`."""
        if index.code_projection is None:
            return self.encode_source(source)[str(index.bits)]
        weight = float(json.loads(index.encoder_json)["descriptor_weight"])
        fitted = CollectionHash(index.code_mean, index.code_projection)
        return fitted(self.transfer_features(source, weight))

    def index_codes(self, codes: np.ndarray, paths: Sequence[str], labels: Any = None):
        """A `HashIndex` of codes this encoder made (`[N, K]`), with their paths and labels."""
        bits = int(np.shape(codes)[1])
        return HashIndex(
            codes=codes,
            labels=np.full(len(paths), -1) if labels is None else labels,
            paths=list(paths),
            checkpoint=f"step {self.step}",
            config_json=json.dumps(self.training_config),
            encoder_json=json.dumps(self.identity | {"bits": bits}),
        )

    def check_index(self, index: Any, name: str = "the index") -> None:
        """Raises `ModelFileError` (one line naming both sides) unless this encoder made the
        index's codes: the same parameters, one of its code lengths, the same preprocessing."""
        made_by = json.loads(index.encoder_json)
        if index.bits not in self.bits:
            raise ModelFileError(
                f"{name} holds {index.bits}-bit codes; this model makes "
                f"{', '.join(map(str, self.bits))}-bit codes"
            )
        if made_by.get("fingerprint") != self.fingerprint:
            raise ModelFileError(
                f"{name} was encoded by model {str(made_by.get('fingerprint'))[:12]} (step "
                f"{made_by.get('step')}), the queries by model {self.fingerprint[:12]} (step "
                f"{self.step}): re-encode the index with this model, or search with that one"
            )
        if made_by.get("preprocessing") != self.preprocessing:
            raise ModelFileError(
                f"{name} was encoded with preprocessing {made_by.get('preprocessing')}, the "
                f"queries with {self.preprocessing}"
            )

    def search(self, index: Any, queries: Any, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
        """Encodes `queries` (as `encode_images` takes them) and searches `index`, which this
        encoder must have made (`check_index`). Returns (paths `Q x k`, distances `[Q, k]`),
        nearest first, ties by index order."""
        self.check_index(index)
        source = _ImageInput(queries)
        if len(source) == 0:
            return index.search(np.zeros((0, index.bits), np.int8), k)
        return index.search(self.index_query_codes(index, source), k)
