"""Gallery marking against labels (not only pixels), and that the figures are written."""

import numpy as np
import pytest
from matplotlib.image import imread

from fdh_jax.evaluation.figures import (
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    QUERY_COLOUR,
    cell_origin,
    compose_gallery,
    gallery_matches,
    plot_pr_curves,
    retrieval_gallery,
)


@pytest.fixture
def small_retrieval():
    rng = np.random.default_rng(0)
    db_images = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    query_images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    db_labels = np.array([0, 1, 0, 2, 1, 0])
    query_labels = np.array([0, 1])
    topk_indices = np.array([[2, 1, 5], [4, 3, 0]])
    topk_distances = np.array([[0, 1, 3], [1, 1, 2]])
    return query_images, query_labels, db_images, db_labels, topk_indices, topk_distances


def test_matches_follow_labels(small_retrieval):
    _, query_labels, _, db_labels, topk_indices, _ = small_retrieval
    # Query 0 (class 0): db 2 (0) yes, db 1 (1) no, db 5 (0) yes.
    # Query 1 (class 1): db 4 (1) yes, db 3 (2) no, db 0 (0) no.
    expected = np.array([[True, False, True], [True, False, False]])
    np.testing.assert_array_equal(gallery_matches(query_labels, db_labels, topk_indices), expected)
    with pytest.raises(ValueError, match="topk_indices"):
        gallery_matches(query_labels, db_labels, topk_indices[:1])


def test_gallery_frames_and_files(tmp_path, small_retrieval):
    query_images, query_labels, db_images, db_labels, topk_indices, topk_distances = small_retrieval
    matches = gallery_matches(query_labels, db_labels, topk_indices)
    grid = compose_gallery(query_images, lambda i: db_images[i], topk_indices, matches)
    for q in range(2):
        top, left = cell_origin(q, 0, 8, 8)
        assert tuple(grid[top, left]) == QUERY_COLOUR
        np.testing.assert_array_equal(
            grid[top + 4 : top + 12, left + 4 : left + 12], query_images[q]
        )
        for j in range(3):
            top, left = cell_origin(q, j + 1, 8, 8)
            colour = (
                MATCH_COLOUR
                if db_labels[topk_indices[q, j]] == query_labels[q]
                else MISMATCH_COLOUR
            )
            assert tuple(grid[top, left]) == colour
            assert tuple(grid[top + 15, left + 15]) == colour  # bottom-right corner of the frame

    png, page = tmp_path / "gallery.png", tmp_path / "gallery.html"
    returned = retrieval_gallery(
        query_images,
        query_labels,
        db_images,
        db_labels,
        topk_indices,
        topk_distances,
        png,
        page,
        class_names=["wren", "finch", "gull"],
    )
    np.testing.assert_array_equal(returned, matches)
    image = imread(png)
    assert image.shape[0] >= grid.shape[0] and image.shape[1] >= grid.shape[1] - 1
    text = page.read_text()
    assert text.count('<td class="match">') == 3 and text.count('<td class="mismatch">') == 3
    assert text.count("data:image/png;base64,") == 2 + 6
    assert "query: finch" in text and "d=3 wren" in text and 'href="gallery.png"' in text
    # A callable database gives the same page.
    retrieval_gallery(
        query_images,
        query_labels,
        lambda i: db_images[i],
        db_labels,
        topk_indices,
        topk_distances,
        tmp_path / "g2.png",
        tmp_path / "g2.html",
        class_names=["wren", "finch", "gull"],
    )
    assert (tmp_path / "g2.html").read_text() == text.replace("gallery.png", "g2.png")


def test_pr_curves_written(tmp_path):
    path = tmp_path / "pr.png"
    curve = (np.linspace(1, 0.2, 13), np.linspace(0, 1, 13))
    plot_pr_curves({12: curve, 48: (curve[0] ** 0.5, curve[1])}, path, title="CUB")
    assert imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match="12 bits"):
        plot_pr_curves({12: (np.ones(3), np.ones(4))}, tmp_path / "bad.png")
