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

from fdh_jax.models.backbones import BatchNorm
from fdh_jax.models.suppression import resize_mask


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


def region_nodes(features: jnp.ndarray, grid_size: int) -> jnp.ndarray:
    """Adaptive average pooling of `[B, H, W, d]` onto a grid: `[B, grid_size**2, d]`."""
    batch, height, width, dim = features.shape
    if height % grid_size == 0 and width % grid_size == 0:
        # Equal bins: a reduction, which XLA fuses with whatever computed `features` (a
        # suppressed map is then never written out at full resolution).
        blocks = features.reshape(
            batch, grid_size, height // grid_size, grid_size, width // grid_size, dim
        )
        return jnp.mean(blocks, axis=(2, 4)).reshape(batch, grid_size * grid_size, dim)
    rows = jnp.asarray(_adaptive_pool_matrix(features.shape[1], grid_size), features.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(features.shape[2], grid_size), features.dtype)
    pooled = jnp.einsum("ih,bhwd,jw->bijd", rows, features, cols)
    return pooled.reshape(features.shape[0], grid_size * grid_size, features.shape[-1])


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
    All four are linear in `F` and `F w`, so they are computed from the region and spatial sums
    of those two maps: `F w` is the only extra full-resolution product (XLA fuses it into the
    reductions), where forming each suppressed and weighted map took four, forward and backward.
    """
    if weights is None:
        mean = jnp.mean(features, axis=(1, 2))[:, None]
        return jnp.concatenate([mean, region_nodes(features, grid_size)], axis=1), None
    weights = weights.astype(features.dtype)
    weighted = features * weights
    area = features.shape[1] * features.shape[2]
    sum_all = jnp.sum(features, axis=(1, 2))
    sum_weighted = jnp.sum(weighted, axis=(1, 2))
    sum_weights = jnp.sum(weights, axis=(1, 2))
    regions_all = region_nodes(features, grid_size)
    regions_weighted = region_nodes(weighted, grid_size)
    foreground = jnp.concatenate(
        [
            (sum_weighted / (sum_weights + 1e-6))[:, None],
            floor * regions_all + (1 - floor) * regions_weighted,
        ],
        axis=1,
    )
    background = jnp.concatenate(
        [
            ((sum_all - sum_weighted) / (area - sum_weights + 1e-6))[:, None],
            regions_all - (1 - floor) * regions_weighted,
        ],
        axis=1,
    )
    return foreground, background


class GraphAttention(nn.Module):
    """Multi-head graph attention (GAT) with message sum over each receiver's incoming edges.

    `e_ij = LeakyReLU(a^T [W h_i || W h_j])` for receiver `i` and sender `j`, normalised with
    `jraph.segment_softmax` over the edges into `i`; the heads are concatenated and projected.
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

        senders, receivers = graph.senders, graph.receivers

        def aggregate(values, s_recv, s_send):
            logits = nn.leaky_relu(s_recv[receivers] + s_send[senders], negative_slope=0.2)
            attention = jraph.segment_softmax(logits.astype(jnp.float32), receivers, num_nodes)
            messages = values[senders] * attention[..., None].astype(values.dtype)
            return jax.ops.segment_sum(messages, receivers, num_nodes)

        out = jax.vmap(aggregate)(projected, score_receiver, score_sender)
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
        self, stage_maps: dict[str, jnp.ndarray], mask: jnp.ndarray | None, train: bool
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Computes descriptors.

        Args:
          stage_maps: backbone outputs, `{"C3": [B, H3, W3, C3], ...}`.
          mask: `[B, h, w, 1]` foreground mask in (0, 1), or None without suppression.
          train: BatchNorm mode.

        Returns:
          `(z, z_background)`, each `[B, (S + 1) * node_dim]`; `z_background` is None when
          `mask` is None. The background descriptor is computed from the same projected maps
          with the complementary mask `1 - M`, through the same graph and readout.
        """
        projected = {}
        for name in self.stages:
            x = nn.Conv(
                self.node_dim, (1, 1), use_bias=False, dtype=self.dtype, name=f"{name}_proj"
            )(stage_maps[name])
            x = BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"{name}_bn")(x)
            projected[name] = nn.relu(x)
        stage_embedding = self.param(
            "stage_embedding", nn.initializers.normal(0.02), (len(self.stages), self.node_dim)
        )

        foreground, background = [], []
        for s, name in enumerate(self.stages):
            x = projected[name]
            w = None if mask is None else resize_mask(mask, x.shape[1], x.shape[2])
            nodes, background_nodes = stage_nodes(x, w, self.mask_floor, self.grid_size)
            embedding = stage_embedding[s].astype(nodes.dtype)
            foreground.append(nodes + embedding)
            if background_nodes is not None:
                background.append(background_nodes + embedding)
        nodes = jnp.concatenate(foreground, axis=1)
        batch = nodes.shape[0]
        if mask is not None:  # the background pass shares every weight: run both as one batch
            nodes = jnp.concatenate([nodes, jnp.concatenate(background, axis=1)], axis=0)

        if self.use_gnn:
            graph = stage_graph(len(self.stages), self.nodes_per_stage)
            for layer in range(self.gnn_layers):
                nodes = GraphBlock(self.gnn_heads, self.dtype, name=f"gnn_{layer}")(nodes, graph)

        global_nodes = nodes[:, :: self.nodes_per_stage].reshape(nodes.shape[0], -1)
        scores = nn.Dense(1, dtype=self.dtype, name="pool_score")(nodes)
        attention = jax.nn.softmax(scores.astype(jnp.float32), axis=1).astype(nodes.dtype)
        pooled = jnp.sum(attention * nodes, axis=1)
        descriptors = jnp.concatenate([global_nodes, pooled], axis=-1)
        if mask is None:
            return descriptors, None
        return descriptors[:batch], descriptors[batch:]
