"""Unlabelled image files (a single image or a folder, searched recursively): search queries."""

from pathlib import Path

import numpy as np

from fdh_jax.data.decode import decode_image
from fdh_jax.data.sources.folder import IMAGE_EXTENSIONS


class ImageFilesSource:
    """A source over image files without classes (`labels` are all -1).

    Args:
      path: one image file, or a folder whose image entries (any depth, sorted; every name with an
        image extension that is not a folder) are used.
    """

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            # Not `is_file()`: a dangling link or a link loop named .jpg is kept, so decoding
            # names it (BadImageError) instead of the query silently losing an image.
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
            )
        else:
            raise FileNotFoundError(f"no image file or folder at {path.resolve()}")
        if not files:
            raise FileNotFoundError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path.resolve()}"
            )
        self.name, self.split = "files", "test"
        self.paths = [str(p) for p in files]
        self.labels = np.full(len(files), -1, np.int32)
        self.class_names: list[str] = []
        self.num_classes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"image": decode_image(path), "label": -1, "path": path}
