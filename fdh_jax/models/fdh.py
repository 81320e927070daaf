"""FDH-MFE: backbone -> background suppression -> multi-level graph -> hash heads.

One forward pass produces continuous codes `h_K = tanh(W_K z / ||z|| + b_K)` for every length `K`
(all heads share the backbone, the mask and the graph), the background codes `h_bg_K` that the
triplet loss uses as negatives, optional class logits, and the class proxies of the proxy loss.
Binary codes come from `binarize`: `where(h >= 0, +1, -1)` as int8, never `sign` (which maps 0
to 0).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fdh_jax.common.ops import l2_normalize
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.mfe import MultiLevelFeatures
from fdh_jax.models.mobilenet import stages_after
from fdh_jax.models.proxies import HashProxies
from fdh_jax.models.suppression import background_mask


class FDHMFE(nn.Module):
    """The FDH-MFE hashing network.

    Call: `images: [B, H, W, 3] float32 (ImageNet-normalised)`, or the backbone's stage maps
    `{"C3": [B, H3, W3, C3], ...}` computed beforehand (a frozen backbone's features: the backbone
    is skipped and needs no parameters) -> dict with
      `hash`: `{"K": [B, K] float32 in (-1, 1)}`; `hash_background`: same, in training
      with suppression only (the triplet loss's negatives; encoding skips that second pass);
      `class_logits`: `[B, C]` (with the classifier); `proxies`: `{"K": [C, K]}`
      (with proxies); `mask`: `[B, h, w, 1]` (with suppression); `descriptor`: `[B, D]`;
      `pooled`: `[B, C5 channels]`, the backbone's C5 averaged over the foreground mask (over
      the whole map without suppression), no parameters: what codes fitted to a collection of
      classes never trained on start from (`fdh_jax.search.adaptation`).

    `flip_average`: outside training, every output is the mean of the image's and its mirror
    image's (the mask stays the image's own), so codes binarise the sum of the two continuous
    codes: test-time flip averaging (docs/design.md, "Evaluation protocol"). Stage maps
    computed beforehand then carry the mirror image's maps too, under `"mirrored"`
    (`{"C3": ..., "C5": ..., "mirrored": {"C3": ..., "C5": ...}}`); mirroring the maps instead
    would change nothing, since everything after the backbone is invariant to it. Training is
    unchanged.
    `trainable_after` ("C2", "C3" or "C4"; with a frozen MobileNetV2): the backbone's layers after
    that stage train, BatchNorm statistics kept, on top of the frozen map of that stage. Given
    precomputed maps, the model reads that stage's map and computes the later ones
    (`precomputed_stages` lists what it reads); given images, the backbone runs whole and, in
    training, the layers after the stage run again on its stopped-gradient map.
    """

    num_classes: int
    bits: Sequence[int] = (12, 24, 32, 48)
    backbone: str = "resnet50"
    width: int = 64
    stages: Sequence[str] = ("C3", "C4", "C5")
    use_suppression: bool = True
    mask_temperature: float = 4.0
    mask_floor: float = 0.25
    mask_gradient: bool = False
    use_gnn: bool = True
    node_dim: int = 512
    grid_size: int = 2
    gnn_layers: int = 2
    gnn_heads: int = 4
    use_classifier: bool = True
    use_proxies: bool = True
    freeze_backbone: bool = False  # backbone BatchNorm keeps its (pretrained) statistics
    proxy_seed: int = 0
    flip_average: bool = False
    pooled_to_heads: bool = False
    trainable_after: str = ""  # with freeze_backbone: the MobileNetV2 layers after it train
    dtype: jnp.dtype = jnp.float32

    def __call__(self, images: jnp.ndarray | dict, train: bool = False) -> dict:
        if train or not self.flip_average:
            if isinstance(images, dict):
                images = {k: v for k, v in images.items() if k != "mirrored"}
            return self.forward(images, train)
        # One pass over the images and their mirror images, stacked along the batch.
        if isinstance(images, dict):
            if "mirrored" not in images:
                raise ValueError(
                    "flip averaging on precomputed stage maps needs the mirror image's maps "
                    "under 'mirrored' (the feature cache stores them with model.flip_average)"
                )
            mirrored = images["mirrored"]
            own = {k: v for k, v in images.items() if k != "mirrored"}
            both = {k: jnp.concatenate([v, mirrored[k]]) for k, v in own.items()}
            batch = jax.tree.leaves(own)[0].shape[0]
        else:
            both = jnp.concatenate([images, images[:, :, ::-1]])
            batch = images.shape[0]  # may be symbolic (an exported program)
        outputs = self.forward(both, train)

        def mean(value):
            return (value[:batch] + value[batch:]) / 2

        averaged = {k: outputs[k] for k in ("proxies",) if k in outputs}
        if "mask" in outputs:
            averaged["mask"] = outputs["mask"][:batch]
        for name in ("pooled", "descriptor", "class_logits"):
            if name in outputs:
                averaged[name] = mean(outputs[name])
        averaged["hash"] = {k: mean(h) for k, h in outputs["hash"].items()}
        return averaged

    @nn.compact
    def forward(self, images: jnp.ndarray | dict, train: bool = False) -> dict:
        """The network on one batch (`__call__` without flip averaging)."""
        backbone = get_backbone(self.backbone, width=self.width, dtype=self.dtype)
        backbone = backbone.clone(parent=self, name="backbone")
        start = self.trainable_after
        if isinstance(images, dict):  # precomputed stage maps of a frozen backbone
            missing = sorted(set(precomputed_stages(self.stages, start)) - set(images))
            if missing:
                raise ValueError(
                    f"precomputed stage maps lack {', '.join(missing)}: the model uses "
                    f"{', '.join(self.stages)} and C5 (for the mask)"
                    + (f", computing those after {start}" if start else "")
                    + f"; got {', '.join(images)}"
                )
            # Stored maps may be float16 (the feature cache): compute in the model's dtype.
            stage_maps = {name: jnp.asarray(m, self.dtype) for name, m in images.items()}
        else:
            backbone_train = train and not self.freeze_backbone
            stage_maps = backbone(images, backbone_train)
        if self.freeze_backbone:  # no backward pass through a backbone that is not updated
            stage_maps = jax.tree.map(jax.lax.stop_gradient, stage_maps)
        if start and (train or isinstance(images, dict)):
            # The layers after `start` train (BatchNorm statistics kept): recompute what follows
            # from the frozen map, so that gradients reach them and no earlier layer.
            stage_maps = stage_maps | backbone(stage_maps[start], False, start=start)
        stage_maps = {name: stage_maps[name] for name in self.stages} | {"C5": stage_maps["C5"]}
        outputs = {}
        mask = None
        if self.use_suppression:
            mask = background_mask(
                stage_maps["C5"], temperature=self.mask_temperature, gradient=self.mask_gradient
            )
            outputs["mask"] = mask
        outputs["pooled"] = _foreground_pooled(stage_maps["C5"], mask)
        descriptor, background = MultiLevelFeatures(
            stages=tuple(self.stages),
            node_dim=self.node_dim,
            grid_size=self.grid_size,
            use_gnn=self.use_gnn,
            gnn_layers=self.gnn_layers,
            gnn_heads=self.gnn_heads,
            mask_floor=self.mask_floor,
            dtype=self.dtype,
            name="mfe",
        )(stage_maps, mask, train, background=train)
        outputs["descriptor"] = descriptor.astype(jnp.float32)

        head_input = _unit(descriptor)
        if self.pooled_to_heads:  # the heads also see the (parameter-free) pooled C5
            head_input = jnp.concatenate([head_input, _unit(outputs["pooled"])], axis=-1)
        heads = {k: nn.Dense(k, dtype=self.dtype, name=f"hash_{k}") for k in self.bits}
        outputs["hash"] = {
            str(k): jnp.tanh(head(head_input).astype(jnp.float32)) for k, head in heads.items()
        }
        if background is not None:
            background_input = _unit(background)
            if self.pooled_to_heads:  # C5 pooled over the background: 1 - mask
                pooled_background = _foreground_pooled(stage_maps["C5"], 1.0 - mask)
                background_input = jnp.concatenate(
                    [background_input, _unit(pooled_background)], axis=-1
                )
            outputs["hash_background"] = {
                str(k): jnp.tanh(head(background_input).astype(jnp.float32))
                for k, head in heads.items()
            }
        if self.use_classifier:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(descriptor)
            outputs["class_logits"] = logits.astype(jnp.float32)
        if self.use_proxies:
            outputs["proxies"] = HashProxies(
                self.num_classes, tuple(self.bits), self.proxy_seed, name="proxies"
            )()
        return outputs


def precomputed_stages(stages: Sequence[str], trainable_after: str = "") -> tuple[str, ...]:
    """The backbone maps that the model reads when they are computed beforehand (a frozen
    backbone's feature cache): `stages` and C5, except those that the trainable layers after
    stage `trainable_after` compute, plus that stage's own map."""
    needed = {*stages, "C5"}
    if trainable_after:
        needed = (needed - set(stages_after(trainable_after))) | {trainable_after}
    return tuple(sorted(needed))


def _foreground_pooled(deepest_stage: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """`sum(F M) / sum(M)` over the map (the plain mean when `mask` is None), in float32."""
    features = deepest_stage.astype(jnp.float32)
    if mask is None:
        return jnp.mean(features, axis=(1, 2))
    weights = mask.astype(jnp.float32)
    return jnp.sum(features * weights, axis=(1, 2)) / jnp.sum(weights, axis=(1, 2))


def _unit(descriptor: jnp.ndarray) -> jnp.ndarray:
    """L2-normalised descriptor: the input of the hash heads.

    With Adam every weight moves by about the learning rate per step, so a pre-activation
    `W z` moves by up to `lr * ||z||_1`. On the raw descriptor (`D = (S + 1) * node_dim` = 2048
    LayerNorm-scaled values, `||z||_1 ~ 1600`) that is ~1.6 per step at lr 1e-3: the tanh heads
    saturated at +-1 within 20 steps on real photos and stopped learning. On the unit vector it
    is at most `lr * sqrt(D)`, and the heads start in tanh's linear range.
    """
    return l2_normalize(descriptor, eps=1e-12)


def binarize(hash_values: jnp.ndarray) -> jnp.ndarray:
    """Continuous codes `[..., K]` -> int8 codes in {-1, +1} (0 maps to +1)."""
    return jnp.where(hash_values >= 0, 1, -1).astype(jnp.int8)


def init_variables(model: FDHMFE, seed: int = 0, image_size: int = 224) -> dict:
    """Initial `{"params", "batch_stats"}` of `model` for square `image_size` inputs (jitted)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda: model.init(jax.random.key(seed), images, train=False))()


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> FDHMFE:
    """The FDH-MFE module described by `config.model` / `config.bits` / `config.loss`."""
    model = config.model
    return FDHMFE(
        num_classes=num_classes,
        bits=tuple(config.bits),
        backbone=model.backbone,
        width=model.width,
        stages=tuple(model.stages),
        use_suppression=model.use_suppression,
        mask_temperature=model.mask_temperature,
        mask_floor=model.mask_floor,
        mask_gradient=model.mask_gradient,
        use_gnn=model.use_gnn,
        node_dim=model.node_dim,
        grid_size=model.grid_size,
        gnn_layers=model.gnn_layers,
        gnn_heads=model.gnn_heads,
        use_classifier=model.use_classifier,
        use_proxies=config.loss.use_proxy,
        freeze_backbone=model.freeze_backbone,
        proxy_seed=config.seed,
        # Absent from the records of runs made before it existed: those encode without it.
        flip_average=bool(model.get("flip_average", False)),
        pooled_to_heads=bool(model.get("pooled_to_heads", False)),
        trainable_after=str(model.get("trainable_after", "")),
        dtype=jnp.bfloat16 if model.dtype == "bfloat16" else jnp.float32,
    )
