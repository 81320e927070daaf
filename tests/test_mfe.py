"""Multi-level feature extraction: graph structure, pooling and graph attention vs NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdh_jax.models import mfe
from fdh_jax.models.suppression import background_mask, suppress


def test_stage_graph_is_fully_connected_without_self_loops():
    graph = mfe.stage_graph(num_stages=3, nodes_per_stage=5)
    adjacency = np.zeros((15, 15), int)
    adjacency[graph.receivers, graph.senders] += 1
    np.testing.assert_array_equal(adjacency, 1 - np.eye(15, dtype=int))
    assert int(graph.n_edge[0]) == 15 * 14


def test_region_nodes_match_adaptive_average_pooling():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    nodes, background = mfe.stage_nodes(jnp.asarray(x), None, 0.25, 2)
    assert background is None
    np.testing.assert_allclose(nodes[:, 0], x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    got = np.asarray(nodes[:, 1:])
    # PyTorch adaptive pooling bins: [floor(i*H/g), ceil((i+1)*H/g)).
    expected = np.stack(
        [
            x[:, r0:r1, c0:c1].mean(axis=(1, 2))
            for r0, r1 in [(0, 3), (2, 5)]
            for c0, c1 in [(0, 4), (3, 7)]
        ],
        axis=1,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _pool(x, rows, cols):
    """Adaptive average pooling of `[B, H, W, d]` with the given bins -> `[B, bins, d]`."""
    return np.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in rows for c0, c1 in cols], 1)


def test_stage_nodes_match_suppressed_and_weighted_pooling():
    rng = np.random.default_rng(5)
    floor = 0.25
    for height, width, rows, cols in [
        (4, 6, [(0, 2), (2, 4)], [(0, 3), (3, 6)]),  # equal bins: the reduction path
        (5, 7, [(0, 3), (2, 5)], [(0, 4), (3, 7)]),  # overlapping bins: the matrix path
    ]:
        x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        w = rng.uniform(size=(2, height, width, 1)).astype(np.float32)
        fg, bg = mfe.stage_nodes(jnp.asarray(x), jnp.asarray(w), floor, 2)
        for got, weights in ((fg, w), (bg, 1 - w)):
            suppressed = x * (floor + (1 - floor) * weights)
            global_node = (x * weights).sum(axis=(1, 2)) / (weights.sum(axis=(1, 2)) + 1e-6)
            expected = np.concatenate([global_node[:, None], _pool(suppressed, rows, cols)], 1)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
        plain, none = mfe.stage_nodes(jnp.asarray(x), None, floor, 2)
        expected = np.concatenate([x.mean(axis=(1, 2))[:, None], _pool(x, rows, cols)], 1)
        np.testing.assert_allclose(np.asarray(plain), expected, rtol=1e-5, atol=1e-6)
        assert none is None


def _dense_gat_reference(params, nodes, num_heads):
    """Dense multi-head GAT: softmax over every other node (the graph is complete)."""
    w = np.asarray(params["W"]["kernel"], np.float64)
    a_recv = np.asarray(params["a_receiver"], np.float64)
    a_send = np.asarray(params["a_sender"], np.float64)
    out_w = np.asarray(params["out"]["kernel"], np.float64)
    out_b = np.asarray(params["out"]["bias"], np.float64)
    batch, n, d = nodes.shape
    dh = d // num_heads
    result = np.zeros((batch, n, d))
    for b in range(batch):
        wh = (nodes[b] @ w).reshape(n, num_heads, dh)
        heads = np.zeros((n, num_heads, dh))
        for h in range(num_heads):
            for i in range(n):
                scores = []
                for j in range(n):
                    e = wh[i, h] @ a_recv[:, h] + wh[j, h] @ a_send[:, h]
                    scores.append(e if e > 0 else 0.2 * e)
                scores = np.array(scores)
                scores[i] = -np.inf  # no self-loop
                alpha = np.exp(scores - scores.max())
                alpha /= alpha.sum()
                heads[i, h] = alpha @ wh[:, h]
        result[b] = heads.reshape(n, d) @ out_w + out_b
    return result


def test_graph_attention_matches_dense_numpy():
    num_heads, graph = 2, mfe.stage_graph(2, 3)
    layer = mfe.GraphAttention(num_heads)
    nodes = np.random.default_rng(1).normal(size=(3, 6, 8)).astype(np.float32)
    variables = layer.init(jax.random.key(0), nodes, graph)
    got = layer.apply(variables, nodes, graph)
    expected = _dense_gat_reference(variables["params"], nodes.astype(np.float64), num_heads)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_background_mask_matches_numpy_and_suppresses():
    c5 = np.random.default_rng(2).normal(size=(2, 3, 3, 4)).astype(np.float32)
    got = np.asarray(background_mask(jnp.asarray(c5), temperature=4.0))
    a = np.maximum(c5, 0).sum(-1, keepdims=True)
    a_hat = (a - a.mean(axis=(1, 2, 3), keepdims=True)) / (
        a.std(axis=(1, 2, 3), keepdims=True) + 1e-5
    )
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-4.0 * a_hat)), rtol=1e-5)
    features = np.ones((2, 3, 3, 5), np.float32)
    suppressed = np.asarray(suppress(jnp.asarray(features), jnp.asarray(got), floor=0.25))
    np.testing.assert_allclose(suppressed[..., 0], 0.25 + 0.75 * got[..., 0], rtol=1e-6)


def test_mask_gradient_switch():
    c5 = jnp.asarray(np.random.default_rng(3).normal(size=(1, 2, 2, 3)), jnp.float32)
    stopped = jax.grad(lambda x: background_mask(x, gradient=False).sum())(c5)
    flowing = jax.grad(lambda x: (background_mask(x, gradient=True) ** 2).sum())(c5)
    assert float(jnp.abs(stopped).sum()) == 0.0
    assert float(jnp.abs(flowing).sum()) > 0.0


def test_background_descriptor_shares_weights_and_differs():
    module = mfe.MultiLevelFeatures(stages=("C4", "C5"), node_dim=8, gnn_heads=2, gnn_layers=1)
    rng = np.random.default_rng(4)
    maps = {
        "C4": jnp.asarray(rng.normal(size=(2, 4, 4, 6)), jnp.float32),
        "C5": jnp.asarray(rng.normal(size=(2, 2, 2, 6)), jnp.float32),
    }
    mask = background_mask(maps["C5"])
    variables = module.init(jax.random.key(0), maps, mask, False)
    z, z_bg = module.apply(variables, maps, mask, False)
    assert z.shape == z_bg.shape == (2, 3 * 8)
    # Swapping the mask for its complement swaps the two descriptors: same weights, both passes.
    z_swapped, z_bg_swapped = module.apply(variables, maps, 1.0 - mask, False)
    np.testing.assert_allclose(z_swapped, z_bg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z_bg_swapped, z, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z, z_bg)


class _ReferenceProjection(nn.Module):
    """What `project_stage` computes, written with Flax's own conv and BatchNorm."""

    node_dim: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.node_dim, (1, 1), use_bias=False, name="C3_proj")(x)
        x = nn.BatchNorm(not train, momentum=0.9, epsilon=1e-5, name="C3_bn")(x)
        return nn.relu(x)


class _Projection(nn.Module):
    node_dim: int

    @nn.compact
    def __call__(self, x, train):
        return mfe.project_stage("C3", x, self.node_dim, train, jnp.float32)


def test_project_stage_matches_flax_conv_batchnorm_relu():
    rng = np.random.default_rng(6)
    # 3 < 8 channels: statistics from the input's moments; 12 > 8: from the projected map.
    for channels in (3, 12):
        x = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 5, 6, channels)), jnp.float32)
        reference, module = _ReferenceProjection(8), _Projection(8)
        variables = reference.init(jax.random.key(0), x, False)
        ours = module.init(jax.random.key(0), x, False)
        assert jax.tree.structure(ours) == jax.tree.structure(variables)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(variables), strict=True):
            np.testing.assert_array_equal(a, b)
        variables = {  # non-trivial BatchNorm parameters and running statistics
            "params": {
                "C3_proj": variables["params"]["C3_proj"],
                "C3_bn": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)},
            },
            "batch_stats": {"C3_bn": {"mean": jnp.linspace(-1, 1, 8), "var": jnp.full(8, 3.0)}},
        }
        for train in (False, True):
            want, want_stats = reference.apply(variables, x, train, mutable=["batch_stats"])
            got, got_stats = module.apply(variables, x, train, mutable=["batch_stats"])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

        def loss(params, net, variables, x):
            out, _ = net.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            ramp = jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size
            return jnp.sum(out * ramp)

        want = jax.grad(loss)(variables["params"], reference, variables, x)
        got = jax.grad(loss)(variables["params"], module, variables, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_map_in_chunks_on_cpu_equals_one_batch():
    from fdh_jax import parallel

    x = jnp.asarray(np.random.default_rng(7).normal(size=(12, 5)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(8).normal(size=(5, 3)), jnp.float32)

    def fn(inputs):
        return {"y": jnp.tanh(inputs["x"] @ kernel), "n": jnp.sum(inputs["x"] ** 2, axis=1)}

    whole = fn({"x": x})
    for chunk in (4, 5, 12):  # 5 does not divide 12: gcd 1, one batch
        got = jax.jit(lambda v, c=chunk: parallel.map_in_chunks_on_cpu(fn, v, c))({"x": x})
        for key in whole:
            np.testing.assert_allclose(got[key], whole[key], rtol=1e-6, atol=1e-6)
