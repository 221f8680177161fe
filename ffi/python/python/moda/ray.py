"""Batch inference on Ray Data: :class:`Describer` and :class:`Embedder`, callable classes
for ``ray.data.Dataset.map_batches``.

Ray creates the class once per actor, so each actor opens the bundle once and then describes
(and optionally embeds) every batch of rows it is given::

    import ray
    from moda.ray import Describer

    ds = ray.data.read_csv("catalog.csv")          # a column of image paths
    out = ds.map_batches(
        Describer,
        fn_constructor_kwargs={"bundle": "demo/bundle", "image_column": "path", "threads": 2},
        compute=ray.data.ActorPoolStrategy(size=4),  # actors
        num_cpus=2,                                  # cores reserved per actor = threads
        batch_size=32,
        batch_format="numpy",
    )
    out.write_parquet("descriptions/")

For embeddings alone, :class:`Embedder` takes the same arguments (less the generation ones) and
opens only the bundle's image side, in about half the time and memory.

The classes do not import Ray: they need numpy, pyarrow (a dependency of Ray Data) and
``moda``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import numpy as np

from ._native import Description, Model

if TYPE_CHECKING:
    import pyarrow

__all__ = ["Describer", "Embedder"]


def _image(value: Any) -> Any:
    """One cell of the image column as something ``Model.describe_batch`` accepts: a path
    (numpy gives ``np.str_``), encoded bytes, or decoded pixels (``uint8`` ``(H, W, 3)``)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise TypeError(
        f"image column holds {type(value).__name__}: expected paths, encoded bytes or "
        "uint8 (H, W, 3) pixel arrays"
    )


class Describer:
    """Describes the images of a batch of rows (for ``Dataset.map_batches`` with
    ``batch_format="numpy"``); opens the bundle once per actor and returns each batch as a
    ``pyarrow.Table``, whose list columns Parquet stores as plain lists.

    ``image_column`` holds image paths (``str``; relative ones start at ``root``), encoded
    bytes (``ray.data.read_binary_files``) or pixels (``ray.data.read_images``, mode RGB).
    Each output batch keeps the input's columns, except an image column of bytes or pixels
    (which would only make the output large), and adds ``description`` (``str``, null for
    an image that failed), ``finish`` (``str``: why generation ended, ``"length"`` where the
    token limit cut the text; null for an image that failed), ``token_ids`` (list of int64)
    and ``logprobs`` (list of float32),
    ``error`` (null, or MODA's message for that image: one bad image does not fail the batch),
    for a bundle with a caption schema a ``<Field>`` column (``str``, null where the text
    yields no known value) and a ``<Field>_confidence`` column (``float32``) per field in
    template order (as ``moda-sdk describe --format csv`` writes them), and, with ``embed=True``, ``embedding`` (a fixed-size list of float32, L2-normalised with
    ``normalize=True``; NaN for an image that failed). ``threads`` and ``sessions`` are
    :class:`moda.Model`'s: give each actor ``num_cpus`` equal to its ``threads``.
    ``generation`` holds generation keywords (``{"num_beams": 4}``).
    """

    def __init__(
        self,
        bundle: str,
        *,
        image_column: str = "image",
        root: Optional[str] = None,
        embed: bool = False,
        normalize: bool = True,
        threads: Optional[int] = None,
        sessions: int = 1,
        generation: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.model = Model(bundle, threads=threads, sessions=sessions)
        self.image_column = image_column
        self.root = root
        self.embed = embed
        self.normalize = normalize
        self.generation = dict(generation or {})

    def __call__(self, batch: Dict[str, np.ndarray]) -> "pyarrow.Table":
        import pyarrow as pa

        images = _batch_images(batch, self.image_column, self.root)
        n = len(images)
        results = self.model.describe_batch(images, errors="return", **self.generation)
        ok = [isinstance(r, Description) for r in results]
        columns = _input_columns(batch, self.image_column, images)
        columns["description"] = pa.array(
            [r.text if good else None for r, good in zip(results, ok)], pa.string()
        )
        columns["finish"] = pa.array(
            [r.finish if good else None for r, good in zip(results, ok)], pa.string()
        )
        columns["token_ids"] = pa.array(
            [r.token_ids if good else None for r, good in zip(results, ok)],
            pa.list_(pa.int64()),
        )
        columns["logprobs"] = pa.array(
            [r.logprobs if good else None for r, good in zip(results, ok)],
            pa.list_(pa.float32()),
        )
        columns["error"] = pa.array(
            [None if good else str(r) for r, good in zip(results, ok)], pa.string()
        )
        for field in self.model.attribute_names or []:
            attrs = [
                (r.attributes or {}).get(field) if good else None for r, good in zip(results, ok)
            ]
            columns[field] = pa.array([a.value if a else None for a in attrs], pa.string())
            columns[f"{field}_confidence"] = pa.array(
                [a.confidence if a else None for a in attrs], pa.float32()
            )
        if self.embed:
            # Each description carries the embedding its encoder run computed.
            d = self.model.embedding_dim
            emb = np.full((n, d), np.nan, dtype=np.float32)
            for i, r in enumerate(results):
                if ok[i]:
                    emb[i] = r.embedding(normalize=self.normalize)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), d)
        return pa.table(columns)


class Embedder:
    """Embeds the images of a batch of rows (for ``Dataset.map_batches`` with
    ``batch_format="numpy"``), with the bundle opened for embeddings only (its encoder and
    projector; see :class:`moda.Model`'s ``embeddings_only``). Returns each batch as a
    ``pyarrow.Table`` with the input's columns (less an image column of bytes or pixels, as
    :class:`Describer`), ``embedding`` (a fixed-size list of float32, L2-normalised with
    ``normalize=True``; NaN for an image that failed) and ``error`` (null, or MODA's message
    for that image: one bad image does not fail the batch). ``image_column``, ``root``,
    ``threads`` and ``sessions`` as in :class:`Describer`.
    """

    def __init__(
        self,
        bundle: str,
        *,
        image_column: str = "image",
        root: Optional[str] = None,
        normalize: bool = True,
        threads: Optional[int] = None,
        sessions: int = 1,
    ) -> None:
        self.model = Model(bundle, threads=threads, sessions=sessions, embeddings_only=True)
        self.image_column = image_column
        self.root = root
        self.normalize = normalize

    def __call__(self, batch: Dict[str, np.ndarray]) -> "pyarrow.Table":
        import pyarrow as pa

        images = _batch_images(batch, self.image_column, self.root)
        d = self.model.embedding_dim
        if images:
            # One batch through the encoder; a failed image's row is NaN, its error kept.
            emb, failed = self.model.embed(images, normalize=self.normalize, errors="return")
        else:
            emb, failed = np.zeros((0, d), dtype=np.float32), []
        columns = _input_columns(batch, self.image_column, images)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), d)
        columns["error"] = pa.array(
            [None if e is None else str(e) for e in failed], pa.string()
        )
        return pa.table(columns)


def _batch_images(batch: Dict[str, np.ndarray], column: str, root: Optional[str]) -> List[Any]:
    """The batch's image column as inputs of :class:`moda.Model` (relative paths joined to
    ``root``)."""
    if column not in batch:
        raise KeyError(f"no column {column!r} in the batch (columns: {sorted(batch)})")
    images = [_image(v) for v in batch[column]]
    if root is not None:
        images = [os.path.join(root, im) if isinstance(im, str) else im for im in images]
    return images


def _input_columns(
    batch: Dict[str, np.ndarray], column: str, images: List[Any]
) -> Dict[str, Any]:
    """The batch's columns for the output, less an image column of bytes or pixels."""
    import pyarrow as pa

    columns: Dict[str, Any] = {}
    for name, values in batch.items():
        if name == column and not all(isinstance(im, str) for im in images):
            continue
        values = np.asarray(values)
        columns[name] = pa.array(list(values) if values.ndim > 1 else values)
    return columns
