"""The FDH-MFE losses, each a pure function of arrays (docs/design.md, "Losses").

Per code length `K`: proxy loss + bit balance + quantisation + background-aware triplet loss
(+ optionally the neighbourhood and instance terms); once: classification and proxy
uniformity. `total_loss` combines them as configured and returns the parts for logging.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fdh_jax.common.ops import l2_normalize

_EPS = 1e-8  # of the L2 normalisation of codes and proxies


def proxy_loss(
    hash_values: jnp.ndarray,
    proxies: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    scale: float = 16.0,
    margin: float = 0.2,
) -> jnp.ndarray:
    """Normalised-softmax proxy loss with an additive cosine margin.

    `CE(s * (cos(h, P) - m * onehot(y)), y)`, averaged over the batch.

    Args:
      hash_values: `[B, K]` continuous codes.
      proxies: `[C, K]` class proxies.
      labels: `[B]` int class indices.
    """
    cosine = l2_normalize(hash_values, _EPS) @ l2_normalize(proxies, _EPS).T
    one_hot = jax.nn.one_hot(labels, proxies.shape[0], dtype=cosine.dtype)
    logits = scale * (cosine - margin * one_hot)
    return jnp.mean(optax.softmax_cross_entropy(logits, one_hot))


def proxy_uniformity(proxies: jnp.ndarray, *, t: float = 2.0) -> jnp.ndarray:
    """Wang & Isola uniformity of the proxies on the sphere.

    `log mean_{i != j} exp(-t * ||p_i - p_j||^2)` over L2-normalised proxies `[C, K]`; lower is
    more uniform. Since `||p_i - p_j||^2 = 2 - 2 cos(p_i, p_j)`, this is a log-mean-exp of the
    pairwise cosines.
    """
    p = l2_normalize(proxies, _EPS)
    num = p.shape[0]
    if num < 2:
        return jnp.zeros((), p.dtype)
    sq_dist = jnp.maximum(2.0 - 2.0 * (p @ p.T), 0.0)
    off_diagonal = ~jnp.eye(num, dtype=bool)
    logits = jnp.where(off_diagonal, -t * sq_dist, -jnp.inf)
    return jax.nn.logsumexp(logits) - jnp.log(num * (num - 1.0))


def bit_balance_loss(hash_values: jnp.ndarray) -> jnp.ndarray:
    """`||mean_batch(h)||^2 / K`: zero when every bit splits the batch evenly.

    Divided by `K` so that one weight suits every code length.
    """
    return jnp.mean(jnp.square(jnp.mean(hash_values, axis=0)))


def quantization_loss(hash_values: jnp.ndarray) -> jnp.ndarray:
    """`mean((|h| - 1)^2)`: pulls continuous codes to the corners of the hypercube."""
    return jnp.mean(jnp.square(jnp.abs(hash_values) - 1.0))


def triplet_loss(
    hash_values: jnp.ndarray,
    labels: jnp.ndarray,
    background_values: jnp.ndarray | None = None,
    *,
    margin: float = 0.25,
) -> jnp.ndarray:
    """Batch-hard triplet loss with the anchor's own background code as an extra negative.

    Distances are Euclidean between L2-normalised codes. For each anchor with at least one
    positive: `relu(d(a, hardest positive) - d(a, hardest other-class negative) + margin)`, plus,
    when `background_values` is given, `relu(d(a, hardest positive) - d(a, bg(a)) + margin)`, so
    the code of an image must be closer to its class than to its own background. Anchors
    without positives (or without negatives, for the first term) are left out of the mean.

    Args:
      hash_values: `[B, K]` foreground codes.
      labels: `[B]` int classes.
      background_values: `[B, K]` codes of each image's background descriptor, or None.
    """
    h = l2_normalize(hash_values, _EPS)
    sq = jnp.maximum(jnp.sum(jnp.square(h[:, None] - h[None]), axis=-1), 0.0)
    same = labels[:, None] == labels[None]
    not_self = ~jnp.eye(labels.shape[0], dtype=bool)
    positive = same & not_self
    negative = ~same
    # sqrt(x + eps) keeps the gradient finite at x = 0 (identical codes).
    distance = jnp.sqrt(sq + 1e-12)
    hardest_positive = jnp.max(jnp.where(positive, distance, -jnp.inf), axis=1)
    hardest_negative = jnp.min(jnp.where(negative, distance, jnp.inf), axis=1)
    has_positive = jnp.any(positive, axis=1)
    has_negative = jnp.any(negative, axis=1)

    def masked_mean(values, valid):
        valid = valid.astype(values.dtype)
        return jnp.sum(jnp.where(valid > 0, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)

    class_term = jax.nn.relu(hardest_positive - hardest_negative + margin)
    loss = masked_mean(class_term, has_positive & has_negative)
    if background_values is not None:
        bg = l2_normalize(background_values, _EPS)
        bg_distance = jnp.sqrt(jnp.sum(jnp.square(h - bg), axis=-1) + 1e-12)
        loss = loss + masked_mean(
            jax.nn.relu(hardest_positive - bg_distance + margin), has_positive
        )
    return loss


def _unit_pairs(hash_values, teacher, labels):
    """`(t, h, pairs)` of the two neighbourhood forms: the teacher centred on the batch mean and
    L2-normalised (no gradient), the unit codes, and the `[B, B]` mask of the pairs that count
    (`i != j`, or of two classes when `labels` is given)."""
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    t = l2_normalize(teacher - jnp.mean(teacher, axis=0, keepdims=True), _EPS)
    h = l2_normalize(hash_values, _EPS)
    pairs = ~jnp.eye(h.shape[0], dtype=bool)
    if labels is not None:
        pairs = labels[:, None] != labels[None]
    return t, h, pairs


def neighbourhood_loss(
    hash_values: jnp.ndarray,
    teacher: jnp.ndarray,
    labels: jnp.ndarray | None = None,
    *,
    temperature: float = 0.1,
) -> jnp.ndarray:
    """KL divergence from the teacher's neighbourhoods to the codes', over the batch.

    Each row `i` gets two distributions over the other batch items `j != i`:
    `p_ij = softmax_j(cos(t_i, t_j) / T)` from the teacher features, centred on the batch mean
    (the backbone's pooled C5 is non-negative, so uncentred cosines all sit near 1), and
    `q_ij = softmax_j(cos(h_i, h_j) / T)` from the continuous codes. The loss is
    `mean_i KL(p_i || q_i)`: it keeps which images are near which, also across classes and
    within one, the part of the geometry that carries over to classes never trained on. No
    gradient reaches the teacher. With `labels`, `j` runs over the images of the *other*
    classes only: the codes keep which classes look alike, and the supervised terms alone
    decide how close an image is to its own class.

    Args:
      hash_values: `[B, K]` continuous codes.
      teacher: `[B, D]` features whose neighbourhoods the codes should keep (B >= 2).
      labels: `[B]` int classes, or None (every other image is a neighbour candidate). Rows
        without an image of another class are left out of the mean.
      temperature: `T`, of both distributions.
    """
    t, h, others = _unit_pairs(hash_values, teacher, labels)
    rows = jnp.any(others, axis=1)

    def log_softmax(cosine):
        logits = jnp.where(others, cosine / temperature, -jnp.inf)
        return jax.nn.log_softmax(jnp.where(rows[:, None], logits, 0.0), axis=1)

    log_p, log_q = log_softmax(t @ t.T), log_softmax(h @ h.T)
    kl = jnp.sum(jnp.where(others, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=1)
    return jnp.sum(kl) / jnp.maximum(jnp.sum(rows), 1)


def similarity_loss(
    hash_values: jnp.ndarray, teacher: jnp.ndarray, labels: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Mean squared gap between the codes' cosines and the teacher's, over pairs of the batch.

    `mean_{i != j} (cos(h_i, h_j) - cos(t_i, t_j))^2`, the teacher centred on the batch mean as
    in `neighbourhood_loss` and without gradient. Where the KL form weighs each image's nearest
    neighbours (at a small temperature nearly one pair per row), this form asks every pair to
    keep its cosine, far pairs too, so the codes keep the features' coarse layout across classes.
    With `labels`, only pairs of two different classes count: the supervised terms alone decide
    how close an image is to its own class.

    Args:
      hash_values: `[B, K]` continuous codes.
      teacher: `[B, D]` features (B >= 2).
      labels: `[B]` int classes, or None (every pair `i != j`). Zero when no pair is left.
    """
    t, h, pairs = _unit_pairs(hash_values, teacher, labels)
    gap = jnp.where(pairs, (h @ h.T - t @ t.T) ** 2, 0.0)
    return jnp.sum(gap) / jnp.maximum(jnp.sum(pairs), 1)


def instance_loss(hash_values: jnp.ndarray, *, temperature: float = 0.2) -> jnp.ndarray:
    """Instance discrimination between two views of each photo, without labels (InfoNCE).

    The batch holds each photo twice, in slots `2k` and `2k + 1` (`train.views_per_image=2`).
    Each code must pick its partner (the other view of its photo) among all other codes of the
    batch, other photos of its own class included: `mean_i -log softmax_{j != i}(cos(h_i, h_j) /
    T)[partner(i)]`. It rewards what tells one photo from another, not only one class from
    another: the part of the codes that may carry over to classes never trained on.

    Args:
      hash_values: `[B, K]` continuous codes, B even, partners adjacent.
      temperature: `T`.
    """
    h = l2_normalize(hash_values, _EPS)
    n = h.shape[0]
    logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, (h @ h.T) / temperature)
    partner = jnp.arange(n) ^ 1
    log_p = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_p, partner[:, None], axis=1))


def classification_loss(logits: jnp.ndarray, labels: jnp.ndarray, *, smoothing: float = 0.1):
    """Label-smoothed softmax cross-entropy, `logits: [B, C]`, `labels: [B]`."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def total_loss(
    outputs: dict, labels: jnp.ndarray, config: ml_collections.ConfigDict
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`L = sum_K [L_proxy + w_tri L_tri + w_q L_q + w_bal L_bal + w_nb L_nb] + w_cls L_cls
    + w_uni L_uni`; `L_nb` (`neighbourhood_loss`, or `similarity_loss` when `neighbourhood_form`
    is "cosine"; teacher: the mask-pooled C5 in `outputs`) only when `neighbourhood_weight > 0`;
    `w_inst L_inst` (`instance_loss`, batches of photo pairs) only when `instance_weight > 0`.

    Args:
      outputs: the dict returned by `FDHMFE.__call__`.
      labels: `[B]` int classes.
      config: the `loss` config.

    Returns:
      `(loss, parts)`; `parts` maps names such as `proxy_24` to scalars.
    """
    parts = {}
    proxies = outputs.get("proxies", {})
    if not config.learnable_proxies:
        proxies = jax.lax.stop_gradient(proxies)
    lengths = config.get("neighbourhood_bits", ())  # of the neighbourhood term; () = all
    other_classes = config.get("neighbourhood_pairs", "all") == "other_classes"
    pair_labels = labels if other_classes else None
    for k, h in outputs["hash"].items():
        if config.use_proxy:
            parts[f"proxy_{k}"] = proxy_loss(
                h,
                proxies[k],
                labels,
                scale=config.proxy_scale,
                margin=config.proxy_margin,
            )
        if config.use_triplet:
            background = outputs.get("hash_background", {}).get(k)
            parts[f"triplet_{k}"] = config.triplet_weight * triplet_loss(
                h, labels, background, margin=config.triplet_margin
            )
        parts[f"quantization_{k}"] = config.quantization_weight * quantization_loss(h)
        parts[f"balance_{k}"] = config.balance_weight * bit_balance_loss(h)
        if config.get("neighbourhood_weight", 0.0) and (not lengths or int(k) in lengths):
            if config.get("neighbourhood_form", "kl") == "cosine":
                term = similarity_loss(h, outputs["pooled"], pair_labels)
            else:
                term = neighbourhood_loss(
                    h, outputs["pooled"], pair_labels, temperature=config.neighbourhood_temperature
                )
            parts[f"neighbourhood_{k}"] = config.neighbourhood_weight * term
        if config.get("instance_weight", 0.0):
            parts[f"instance_{k}"] = config.instance_weight * instance_loss(
                h, temperature=config.instance_temperature
            )
    if config.use_proxy and config.uniformity_weight:
        parts["uniformity"] = config.uniformity_weight * sum(
            proxy_uniformity(p, t=config.uniformity_t) for p in proxies.values()
        )
    if "class_logits" in outputs and config.classification_weight:
        parts["classification"] = config.classification_weight * classification_loss(
            outputs["class_logits"], labels, smoothing=config.label_smoothing
        )
    return sum(parts.values()), parts
