"""Figures for retrieval results: PR curves per code length, and a query -> top-k gallery.

Pure parts (`gallery_matches`, `compose_gallery`) compute arrays; `plot_pr_curves` and
`retrieval_gallery` write files, and `write_figures` draws both for an evaluation. Matplotlib is
used through `Figure` objects with the Agg canvas, so no global backend or pyplot state is
touched.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from PIL import Image

from fdh_jax.evaluation.results import Evaluation
from fdh_jax.search.scan import hamming_topk

MATCH_COLOUR = (0, 170, 0)  # green border: same class as the query
MISMATCH_COLOUR = (210, 0, 0)  # red border: another class
QUERY_COLOUR = (40, 90, 220)  # blue border: the query itself
BORDER = 4  # pixels
GAP = 6  # pixels between cells


def plot_pr_curves(
    curves: dict[int, tuple[np.ndarray, np.ndarray]],
    path_png: str | os.PathLike,
    title: str = "Precision-recall over Hamming radius",
) -> None:
    """Writes one PR curve per code length. `curves: {bits: (precision [K+1], recall [K+1])}`."""
    figure = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for bits in sorted(curves):
        precision, recall = (np.asarray(a, np.float64) for a in curves[bits])
        if precision.shape != recall.shape or precision.ndim != 1:
            raise ValueError(f"{bits} bits: precision {precision.shape}, recall {recall.shape}")
        axes.plot(recall, precision, marker="o", markersize=2.5, label=f"{bits} bits")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(os.fspath(path_png))


def gallery_matches(query_labels: Any, db_labels: Any, topk_indices: Any) -> np.ndarray:
    """`query_labels: [Q]`, `db_labels: [N]`, `topk_indices: [Q, k]` -> `[Q, k]` bool, True
    where the retrieved item has the query's class."""
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    topk_indices = np.asarray(topk_indices)
    if topk_indices.ndim != 2 or topk_indices.shape[0] != query_labels.shape[0]:
        raise ValueError(
            f"topk_indices must be [Q={query_labels.shape[0]}, k], got {topk_indices.shape}"
        )
    return db_labels[topk_indices] == query_labels[:, None]


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[h, w, 3]` uint8 -> `[height, width, 3]` by nearest-neighbour sampling."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be [H, W, 3] uint8, got {image.dtype} {image.shape}")
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    return image[rows][:, cols]


def _framed(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    framed = np.empty((image.shape[0] + 2 * BORDER, image.shape[1] + 2 * BORDER, 3), np.uint8)
    framed[:] = colour
    framed[BORDER:-BORDER, BORDER:-BORDER] = image
    return framed


def cell_origin(row: int, column: int, height: int, width: int) -> tuple[int, int]:
    """Top-left pixel of gallery cell (row, column); column 0 is the query."""
    return row * (height + 2 * BORDER + GAP), column * (width + 2 * BORDER + GAP)


def compose_gallery(
    query_images: np.ndarray,
    db_image: Callable[[int], np.ndarray],
    topk_indices: np.ndarray,
    matches: np.ndarray,
) -> np.ndarray:
    """Grid image: row q = query q (blue frame) then its top-k, green frame for a match, red for a
    mismatch. `query_images: [Q, H, W, 3]` uint8 -> `[Q*(H+2B+G)-G, (k+1)*(W+2B+G)-G, 3]` uint8."""
    num_query, height, width = query_images.shape[:3]
    k = topk_indices.shape[1]
    cell_h, cell_w = height + 2 * BORDER, width + 2 * BORDER
    grid = np.full(
        (num_query * (cell_h + GAP) - GAP, (k + 1) * (cell_w + GAP) - GAP, 3), 255, np.uint8
    )
    for q in range(num_query):
        cells = [_framed(_fit(query_images[q], height, width), QUERY_COLOUR)]
        for j in range(k):
            colour = MATCH_COLOUR if matches[q, j] else MISMATCH_COLOUR
            cells.append(_framed(_fit(db_image(int(topk_indices[q, j])), height, width), colour))
        for column, cell in enumerate(cells):
            top, left = cell_origin(q, column, height, width)
            grid[top : top + cell_h, left : left + cell_w] = cell
    return grid


def _png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    imsave(buffer, image, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _save_grid_png(grid: np.ndarray, cell_size, topk_distances: np.ndarray, path_png) -> None:
    """The gallery grid as a PNG, the Hamming distance written on each retrieved cell."""
    height, width = cell_size
    scale = 100  # dpi: one grid pixel per figure pixel
    figure = Figure(figsize=(grid.shape[1] / scale, grid.shape[0] / scale), dpi=scale)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(grid, interpolation="nearest")
    axes.set_axis_off()
    for q in range(topk_distances.shape[0]):
        for j in range(topk_distances.shape[1]):
            top, left = cell_origin(q, j + 1, height, width)
            axes.text(
                left + BORDER + 2,
                top + BORDER + 2,
                f"d={int(topk_distances[q, j])}",
                color="white",
                fontsize=7,
                va="top",
                backgroundcolor=(0, 0, 0, 0.55),
            )
    figure.savefig(os.fspath(path_png), dpi=scale)


def _gallery_page(rows: list[str], k: int, matches: np.ndarray, path_png) -> str:
    """The static HTML page around the gallery's table rows."""
    png_name = html.escape(os.path.basename(os.fspath(path_png)))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Retrieval gallery</title>
<style>
body {{ font-family: sans-serif; }} td {{ text-align: center; font-size: 12px; padding: 4px; }}
td img {{ border: 4px solid; }}
td.query img {{ border-color: rgb{QUERY_COLOUR}; }}
td.match img {{ border-color: rgb{MATCH_COLOUR}; }}
td.mismatch img {{ border-color: rgb{MISMATCH_COLOUR}; }}
</style></head><body>
<h1>Retrieval gallery</h1>
<p>Each row: the query (blue), then its top-{k} by Hamming distance d;
green = same class, red = other class. {int(matches.sum())} of {matches.size} retrieved match.
Grid image: <a href="{png_name}">{png_name}</a>.</p>
<table>
{chr(10).join(rows)}
</table></body></html>
"""


def retrieval_gallery(
    query_images: np.ndarray,
    query_labels: Any,
    db_images: np.ndarray | Callable[[int], np.ndarray],
    db_labels: Any,
    topk_indices: Any,
    topk_distances: Any,
    path_png: str | os.PathLike,
    path_html: str | os.PathLike,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Writes a PNG grid (each query, then its top-k framed green/red for match/mismatch, with the
    Hamming distance written on each) and a static HTML page with the same rows as embedded base64
    thumbnails plus class names and distances, linking the PNG.

    query_images: [Q, H, W, 3] uint8; db_images: [N, h, w, 3] uint8 or a callable index -> image
    (resized to H x W); labels: [Q], [N] ints; topk_indices, topk_distances: [Q, k].
    Returns the `[Q, k]` match matrix.
    """
    query_images = np.asarray(query_images)
    if query_images.ndim != 4 or query_images.shape[3] != 3 or query_images.dtype != np.uint8:
        raise ValueError(f"query_images must be [Q, H, W, 3] uint8, got {query_images.shape}")
    db_image = db_images if callable(db_images) else (lambda i, images=db_images: images[i])
    topk_indices, topk_distances = np.asarray(topk_indices), np.asarray(topk_distances)
    if topk_distances.shape != topk_indices.shape:
        raise ValueError(f"distances {topk_distances.shape} != indices {topk_indices.shape}")
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    matches = gallery_matches(query_labels, db_labels, topk_indices)
    grid = compose_gallery(query_images, db_image, topk_indices, matches)

    _save_grid_png(grid, query_images.shape[1:3], topk_distances, path_png)

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    height, width = query_images.shape[1:3]
    rows = []
    for q in range(len(query_images)):
        cells = [
            f'<td class="query"><img src="data:image/png;base64,{_png_base64(query_images[q])}">'
            f"<br>query: {html.escape(name(int(query_labels[q])))}</td>"
        ]
        for j in range(topk_indices.shape[1]):
            index = int(topk_indices[q, j])
            kind = "match" if matches[q, j] else "mismatch"
            thumbnail = _png_base64(_fit(db_image(index), height, width))
            cells.append(
                f'<td class="{kind}"><img src="data:image/png;base64,{thumbnail}"><br>'
                f"#{j + 1} d={int(topk_distances[q, j])} "
                f"{html.escape(name(int(db_labels[index])))}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = _gallery_page(rows, topk_indices.shape[1], matches, path_png)
    with open(os.fspath(path_html), "w", encoding="utf-8") as f:
        f.write(page)
    return matches


def write_figures(
    workdir: Path, evaluation: Evaluation, query: Any, database: Any, *, num_queries: int = 8
) -> list[Path]:
    """Writes `pr_curves.png`, and `gallery.png` + `gallery.html` for the longest code.

    The gallery shows `num_queries` queries spread over the query split, each with its top-10
    (ties by database index), framed green where the class matches and red where it does not.
    """
    workdir = Path(workdir)
    curves = {
        int(k): (np.asarray(c["precision"]), np.asarray(c["recall"]))
        for k, c in evaluation.extra["pr_curve"].items()
    }
    plot_pr_curves(curves, workdir / "pr_curves.png", title=f"{evaluation.results['dataset']}: PR")
    longest = str(max(evaluation.results["bits"]))
    chosen = np.linspace(0, len(query) - 1, min(num_queries, len(query))).round().astype(int)
    topk = min(10, len(database))
    distances, indices = hamming_topk(
        evaluation.query_codes[longest][chosen], evaluation.db_codes[longest], topk
    )
    retrieval_gallery(
        np.stack([_thumbnail(query[int(i)]["image"]) for i in chosen]),
        evaluation.query_labels[chosen],
        lambda i: _thumbnail(database[int(i)]["image"]),
        evaluation.db_labels,
        indices,
        distances,
        workdir / "gallery.png",
        workdir / "gallery.html",
        class_names=getattr(database, "class_names", None),
    )
    return [workdir / "pr_curves.png", workdir / "gallery.png", workdir / "gallery.html"]


def _thumbnail(image: np.ndarray, size: int = 96) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
