"""Multi-level feature extraction (MFE): stage nodes and a graph-attention network over them.

Each used stage map is projected to `node_dim` channels (1x1 conv + BN + ReLU), suppressed by the
background mask, and pooled into `g * g` region nodes plus one mask-weighted global node. Every
node gets a learned embedding of its stage. The nodes of all stages form one fully connected
graph per image (no self-loops: a node keeps its own information through the residual), refined
by `L` multi-head graph-attention layers so shallow detail and deep semantics exchange
information. The readout concatenates the refined global nodes of all stages with an attention
pooling over all nodes.

Graphs are `jraph.GraphsTuple`s with one static structure shared by every image of the batch; the
batch is handled by `vmap` over node features, so the batch axis stays the sharded axis.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from fdh_jax.models.suppression import resize_mask, suppressed, suppressed_background


def stage_graph(num_stages: int, nodes_per_stage: int) -> jraph.GraphsTuple:
    """The structure of one image's graph: all stage nodes, fully connected, no self-loops.

    Node `s * nodes_per_stage` is the global node of stage `s`; the rest are its region nodes.
    Returns a `GraphsTuple` with `nodes=None` and static NumPy `senders`/`receivers`.
    """
    num_nodes = num_stages * nodes_per_stage
    receivers, senders = np.nonzero(~np.eye(num_nodes, dtype=bool))
    return jraph.GraphsTuple(
        nodes=None,
        edges=None,
        senders=senders.astype(np.int32),
        receivers=receivers.astype(np.int32),
        n_node=np.array([num_nodes], np.int32),
        n_edge=np.array([senders.size], np.int32),
        globals=None,
    )


def _adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
    """`[bins, size]` averaging matrix with PyTorch adaptive-pool bin edges."""
    matrix = np.zeros((bins, size), np.float32)
    for i in range(bins):
        start, end = (i * size) // bins, -(-((i + 1) * size) // bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def pooling_matrix(height: int, width: int, grid_size: int) -> np.ndarray:
    """`[g * g, H * W]`: row `i * g + j` averages region `(i, j)` of a row-major `H x W` map
    (PyTorch adaptive-average-pool bins, which overlap when `g` does not divide the size)."""
    rows = _adaptive_pool_matrix(height, grid_size)
    cols = _adaptive_pool_matrix(width, grid_size)
    return np.einsum("ih,jw->ijhw", rows, cols).reshape(grid_size * grid_size, height * width)


def stage_nodes(
    features: jnp.ndarray, weights: jnp.ndarray | None, floor: float, grid_size: int
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The nodes of one stage: a global node then `g * g` region nodes, `[B, 1 + g * g, d]`.

    Without a mask (`weights=None`): the spatial mean and the region means of `features`, and
    no background nodes. With the foreground mask `w = weights: [B, H, W, 1]`:
    - foreground: the `w`-weighted mean, and the region means of the suppressed map
      `F * (floor + (1 - floor) w)`;
    - background: the `(1 - w)`-weighted mean, and the region means of
      `F * (floor + (1 - floor) (1 - w))`.
    All four are linear in `F` and `F w`, so they come from the spatial and region sums of those
    two maps, which are one batched matrix product of `F` with `[B, 2 (1 + g * g), H * W]`
    pooling rows: XLA's CPU backend runs that multi-threaded, while reducing the full-resolution
    map elementwise took most of the train step (docs/results.md, "Real photos").
    """
    batch, height, width, dim = features.shape
    area = height * width
    flat = features.reshape(batch, area, dim)
    pool = pooling_matrix(height, width, grid_size)
    rows = jnp.asarray(np.concatenate([np.ones((1, area), np.float32), pool]), features.dtype)
    if weights is None:
        sums = jnp.einsum("rp,bpd->brd", rows, flat)
        return jnp.concatenate([sums[:, :1] / area, sums[:, 1:]], axis=1), None
    w = weights.reshape(batch, 1, area).astype(features.dtype)
    all_rows = jnp.broadcast_to(rows, (batch, *rows.shape))
    sums = jnp.einsum("brp,bpd->brd", jnp.concatenate([all_rows, all_rows * w], axis=1), flat)
    sum_all, regions_all = sums[:, 0], sums[:, 1 : 1 + pool.shape[0]]
    sum_weighted, regions_weighted = sums[:, 1 + pool.shape[0]], sums[:, 2 + pool.shape[0] :]
    sum_weights = jnp.sum(w, axis=2)
    foreground = jnp.concatenate(
        [
            (sum_weighted / (sum_weights + 1e-6))[:, None],
            suppressed(regions_all, regions_weighted, floor),
        ],
        axis=1,
    )
    background = jnp.concatenate(
        [
            ((sum_all - sum_weighted) / (area - sum_weights + 1e-6))[:, None],
            suppressed_background(regions_all, regions_weighted, floor),
        ],
        axis=1,
    )
    return foreground, background


class _ConvKernel(nn.Module):
    """The variable of `nn.Conv(features, (1, 1), use_bias=False)`, returned as `[C, features]`."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> jnp.ndarray:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, in_features, self.features)
        )
        return kernel.reshape(in_features, self.features)


class _BatchNormVariables(nn.Module):
    """The variables of `nn.BatchNorm` (`scale`, `bias`; running `mean`, `var`, decay 0.9).

    Called with the batch statistics (training), it updates the running averages and returns
    `(batch_mean, batch_var, scale, bias)`; called without, `(running mean, var, scale, bias)`.
    """

    features: int
    momentum: float = 0.9

    @nn.compact
    def __call__(self, batch_mean=None, batch_var=None):
        shape = (self.features,)
        mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        if batch_mean is None:
            return mean.value, var.value, scale, bias
        if not self.is_initializing():
            mean.value = self.momentum * mean.value + (1 - self.momentum) * batch_mean
            var.value = self.momentum * var.value + (1 - self.momentum) * batch_var
        return batch_mean, batch_var, scale, bias


def project_stage(
    name: str, features: jnp.ndarray, node_dim: int, train: bool, dtype: jnp.dtype
) -> jnp.ndarray:
    """`relu(BatchNorm(F @ K))`: the 1x1 projection of stage `name`, `[B, H, W, node_dim]`.

    The same function as `nn.Conv(node_dim, (1, 1), use_bias=False)`, `nn.BatchNorm` (eps 1e-5)
    and ReLU, with their variables at `{name}_proj` and `{name}_bn`, computed with the
    normalisation folded into the kernel: `relu(F @ (K a) + (beta - mu a))`, `a = gamma /
    sqrt(var + eps)`. In training, when the stage has fewer channels `C` than `node_dim`, the
    batch statistics of `F K` come from those of `F` (`mu = mean(F) K`, `var = diag(K^T
    Cov(F) K)`, a `C x C` covariance), so the projected map is formed once, already normalised,
    instead of being written, reduced twice and normalised (C3 of MobileNetV2: 32 channels
    projected to 512 at 28 x 28). Must be called inside a compact Flax method (it creates the
    two variable-holding submodules there).
    """
    batch, height, width, channels = features.shape
    kernel = _ConvKernel(node_dim, name=f"{name}_proj")(channels)
    norm = _BatchNormVariables(node_dim, name=f"{name}_bn")
    flat = features.reshape(-1, channels).astype(dtype)
    projected = None
    if not train:
        mean, var, scale, bias = norm()
    elif channels < node_dim:
        moments = flat.astype(jnp.float32)
        input_mean = jnp.mean(moments, axis=0)
        centred = moments - input_mean
        covariance = centred.T @ centred / moments.shape[0]
        mean, var, scale, bias = norm(
            input_mean @ kernel, jnp.sum((covariance @ kernel) * kernel, axis=0)
        )
    else:
        projected = (flat @ kernel.astype(dtype)).astype(jnp.float32)
        batch_mean = jnp.mean(projected, axis=0)
        batch_var = jnp.maximum(jnp.mean(projected * projected, axis=0) - batch_mean**2, 0.0)
        mean, var, scale, bias = norm(batch_mean, batch_var)
    factor = scale * jax.lax.rsqrt(var + 1e-5)
    shift = bias - mean * factor
    if projected is None:
        out = flat @ (kernel * factor).astype(dtype) + shift.astype(dtype)
    else:
        out = (projected * factor + shift).astype(dtype)
    return nn.relu(out).reshape(batch, height, width, node_dim)


class GraphAttention(nn.Module):
    """Multi-head graph attention (GAT) with message sum over each receiver's incoming edges.

    `e_ij = LeakyReLU(a^T [W h_i || W h_j])` for receiver `i` and sender `j`, normalised with a
    softmax over the edges into `i`; the heads are concatenated and projected. Every image has
    the same static structure (`graph.senders`, `graph.receivers`), so the softmax over incoming
    edges is a softmax over the senders of the `[N, N]` adjacency with non-edges masked out:
    the numbers of `jraph.segment_softmax` and a segment sum (tests/test_mfe.py compares with a
    per-edge NumPy loop) as dense `[B, N, N, heads]` products, without the per-edge gathers and
    scatters that cost XLA's CPU backend several times the layer's matrix products.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, nodes: jnp.ndarray, graph: jraph.GraphsTuple) -> jnp.ndarray:
        """`nodes: [B, N, d]` -> `[B, N, d]`."""
        batch, num_nodes, dim = nodes.shape
        head_dim = dim // self.num_heads
        projected = nn.Dense(dim, use_bias=False, dtype=self.dtype, name="W")(nodes)
        projected = projected.reshape(batch, num_nodes, self.num_heads, head_dim)
        init = nn.initializers.lecun_normal()
        a_receiver = self.param("a_receiver", init, (head_dim, self.num_heads))
        a_sender = self.param("a_sender", init, (head_dim, self.num_heads))
        score_receiver = jnp.einsum("bnhd,dh->bnh", projected, a_receiver.astype(self.dtype))
        score_sender = jnp.einsum("bnhd,dh->bnh", projected, a_sender.astype(self.dtype))

        edges = np.zeros((num_nodes, num_nodes), bool)  # [receiver, sender]
        edges[np.asarray(graph.receivers), np.asarray(graph.senders)] = True
        edges = edges[None, :, :, None]
        logits = score_receiver[:, :, None, :] + score_sender[:, None, :, :]  # [B, i, j, h]
        logits = nn.leaky_relu(logits, negative_slope=0.2).astype(jnp.float32)
        attention = jax.nn.softmax(jnp.where(edges, logits, -jnp.inf), axis=2)
        attention = jnp.where(edges, attention, 0.0)  # a node without incoming edges gets 0
        out = jnp.einsum("bijh,bjhd->bihd", attention.astype(projected.dtype), projected)
        return nn.Dense(dim, dtype=self.dtype, name="out")(out.reshape(batch, num_nodes, dim))


class GraphBlock(nn.Module):
    """Graph attention, then an MLP; each with a residual connection and LayerNorm."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, nodes: jnp.ndarray, graph: jraph.GraphsTuple) -> jnp.ndarray:
        dim = nodes.shape[-1]
        attended = GraphAttention(self.num_heads, self.dtype, name="attention")(nodes, graph)
        nodes = nn.LayerNorm(dtype=self.dtype, name="norm1")(nodes + attended)
        hidden = nn.gelu(nn.Dense(2 * dim, dtype=self.dtype, name="mlp_in")(nodes))
        hidden = nn.Dense(dim, dtype=self.dtype, name="mlp_out")(hidden)
        return nn.LayerNorm(dtype=self.dtype, name="norm2")(nodes + hidden)


class MultiLevelFeatures(nn.Module):
    """Stage maps (+ background mask) -> image descriptor `z` (and background descriptor)."""

    stages: Sequence[str] = ("C3", "C4", "C5")
    node_dim: int = 512
    grid_size: int = 2
    use_gnn: bool = True
    gnn_layers: int = 2
    gnn_heads: int = 4
    mask_floor: float = 0.25
    dtype: jnp.dtype = jnp.float32

    @property
    def nodes_per_stage(self) -> int:
        return 1 + self.grid_size**2

    @nn.compact
    def __call__(
        self,
        stage_maps: dict[str, jnp.ndarray],
        mask: jnp.ndarray | None,
        train: bool,
        background: bool = True,
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Computes descriptors.

        Args:
          stage_maps: backbone outputs, `{"C3": [B, H3, W3, C3], ...}`.
          mask: `[B, h, w, 1]` foreground mask in (0, 1), or None without suppression.
          train: BatchNorm mode.
          background: also compute the background descriptor (with a mask).

        Returns:
          `(z, z_background)`, each `[B, (S + 1) * node_dim]`; `z_background` is None when
          `mask` is None or `background` is False. The background descriptor is computed from
          the same projected maps with the complementary mask `1 - M`, through the same graph
          and readout.
        """
        projected = {
            name: project_stage(name, stage_maps[name], self.node_dim, train, self.dtype)
            for name in self.stages
        }
        stage_embedding = self.param(
            "stage_embedding", nn.initializers.normal(0.02), (len(self.stages), self.node_dim)
        )

        foreground, background_stages = [], []
        for s, name in enumerate(self.stages):
            x = projected[name]
            w = None if mask is None else resize_mask(mask, x.shape[1], x.shape[2])
            nodes, background_nodes = stage_nodes(x, w, self.mask_floor, self.grid_size)
            embedding = stage_embedding[s].astype(nodes.dtype)
            foreground.append(nodes + embedding)
            if background_nodes is not None:
                background_stages.append(background_nodes + embedding)
        nodes = jnp.concatenate(foreground, axis=1)
        batch = nodes.shape[0]
        background = background and mask is not None
        if background:  # the background pass shares every weight: run both as one batch
            nodes = jnp.concatenate([nodes, jnp.concatenate(background_stages, axis=1)], axis=0)

        if self.use_gnn:
            graph = stage_graph(len(self.stages), self.nodes_per_stage)
            for layer in range(self.gnn_layers):
                nodes = GraphBlock(self.gnn_heads, self.dtype, name=f"gnn_{layer}")(nodes, graph)

        global_nodes = nodes[:, :: self.nodes_per_stage].reshape(nodes.shape[0], -1)
        scores = nn.Dense(1, dtype=self.dtype, name="pool_score")(nodes)
        attention = jax.nn.softmax(scores.astype(jnp.float32), axis=1).astype(nodes.dtype)
        pooled = jnp.sum(attention * nodes, axis=1)
        descriptors = jnp.concatenate([global_nodes, pooled], axis=-1)
        if not background:
            return descriptors, None
        return descriptors[:batch], descriptors[batch:]
