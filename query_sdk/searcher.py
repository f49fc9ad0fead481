"""The query SDK's one object: a query bundle and a gallery, opened and checked together.

>>> s = Searcher.open(bundle="bundle/", gallery="gallery/")          # doctest: +SKIP
>>> s.search("shoe.png", k=5, max_uncertainty="q0.9")               # doctest: +SKIP
[Hit(id='fashion-mnist:train/17', score=0.93, uncertainty=0.004, payload=None), ...]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle_format import (
    QUANTIZATIONS,
    QUERY_ROLE,
    Artifact,
    BundleManifest,
    find_artifact,
    read_bundle_manifest,
    verify_bundle,
)
from .images import ImageError, ImageLike, load_image
from .runtimes import BACKENDS, BackendError, Runtime, check_backend, open_runtime
from .shards import Gallery, Hit
from .spec import InputSpec

__all__ = ["Searcher"]


class Searcher:
    """Embeds query images with the bundle's model and searches the gallery's shards.

    Use :meth:`open`. ``gallery`` is the :class:`~query_sdk.shards.Gallery` (search by
    vector, memory in use), ``bundle`` the bundle manifest, ``runtime`` the loaded model.
    """

    def __init__(
        self,
        bundle: BundleManifest,
        artifact: Artifact,
        runtime: Runtime,
        gallery: Gallery,
        threads: int,
    ) -> None:
        self.bundle, self.artifact, self.runtime = bundle, artifact, runtime
        self.gallery, self.threads = gallery, threads

    @classmethod
    def open(
        cls,
        *,
        bundle: str | os.PathLike[str],
        gallery: str | os.PathLike[str],
        backend: str = "onnxruntime",
        threads: int = 1,
        quantization: str | None = None,
        public_key: str | bytes | None = None,
        shards: Sequence[int] | None = None,
    ) -> Searcher:
        """Open a bundle and a gallery; everything is checked before it is used.

        ``backend``: "onnxruntime" (default: the ``.onnx`` artifact), "onnxruntime-ort" (the
        ``.ort`` one), "executorch" or "coreml" (macOS).
        ``quantization``: one of ``QUANTIZATIONS`` ("fp32", "fp16", "int8", "pal6", "pal4");
        default the first the bundle has for the backend in that order. ``public_key`` (hex,
        bytes or a ``.pub`` file): refuse galleries not signed with it. ``shards``: positions
        of the shards to load (default all), e.g. to fit a memory budget. ``threads`` is used
        by the model and the search.

        Raises BundleError / GalleryError / SignatureError naming the file and problem (a
        gallery from another embedding space names both ids), BackendError when the backend
        cannot run here.
        """
        check_backend(backend)
        bundle = Path(bundle)
        manifest = read_bundle_manifest(bundle)
        artifact = _pick_artifact(manifest, BACKENDS[backend], quantization)
        loaded = Gallery.open(
            gallery,
            shards=shards,
            public_key=public_key,
            space_id=manifest.space_id,
            dim=manifest.embedding_dim,
        )
        verify_bundle(bundle, [artifact])
        runtime = open_runtime(backend, bundle / artifact.file, artifact, threads)
        return cls(manifest, artifact, runtime, loaded, threads)

    @property
    def spec(self) -> InputSpec:
        """How images are converted for the model (from the bundle)."""
        return self.bundle.input_spec

    def __repr__(self) -> str:
        return (
            f"Searcher(model={self.artifact.file!r} {self.artifact.quantization} via "
            f"{self.runtime.backend}, space_id={self.bundle.space_id!r}, {self.gallery!r})"
        )

    def embed(self, image: ImageLike) -> np.ndarray:
        """The query vector (dim,) of one image: a path, a PIL image or a uint8 array."""
        return self._embed(np.stack([load_image(image, self.spec)]))[0]

    def search(
        self, image: ImageLike, k: int = 10, max_uncertainty: float | str | None = None
    ) -> list[Hit]:
        """The k best gallery items for one image, best first.

        ``max_uncertainty``: leave out gallery items whose stored uncertainty is above this
        value, or above a quantile of the gallery's uncertainties named like ``"q0.9"``.
        An image that cannot be read raises ImageError naming it.
        """
        return self.gallery.search(self.embed(image), k, max_uncertainty, self.threads)[0]

    def search_batch(
        self, images: Sequence[ImageLike], k: int = 10, max_uncertainty: float | str | None = None
    ) -> list[list[Hit] | ImageError]:
        """:meth:`search` for many images, in one model call; one entry per image, in order.

        An image that cannot be read gets its ImageError (naming the file) in its place,
        like ``asyncio.gather(..., return_exceptions=True)``; the others are still answered.
        """
        results: list[list[Hit] | ImageError] = []
        pixels = []
        for image in images:
            try:
                pixels.append(load_image(image, self.spec))
                results.append([])
            except ImageError as exc:
                results.append(exc)
        if pixels:
            vectors = self._embed(np.stack(pixels))
            hits = iter(self.gallery.search(vectors, k, max_uncertainty, self.threads))
            results = [r if isinstance(r, ImageError) else next(hits) for r in results]
        return results

    def _embed(self, images: np.ndarray) -> np.ndarray:
        """Model outputs, re-normalised (low-precision models drift off norm 1)."""
        out = self.runtime.run(images)
        try:
            return renormalise(out)
        except ValueError:
            raise BackendError(f"{self.artifact.file}: the model returned a zero vector") from None


def renormalise(vectors: np.ndarray) -> np.ndarray:
    """Rows of float32 ``vectors`` scaled to norm 1: the norm from a float64 sum of squares,
    the division in float32, as libcmce_query does, so that both SDKs give the same bits for
    the same model output. ValueError for a row of norm below 1e-6."""
    norms = np.sqrt(np.square(vectors, dtype=np.float64).sum(axis=1, keepdims=True))
    norms = norms.astype(np.float32)
    if (norms < 1e-6).any():
        raise ValueError("a zero vector")
    return vectors / norms


def _pick_artifact(manifest: BundleManifest, target: str, quantization: str | None) -> Artifact:
    if quantization is not None:
        return find_artifact(manifest, target, quantization)
    for q in QUANTIZATIONS:
        for a in manifest.artifacts:
            if (a.target, a.quantization, a.role) == (target, q, QUERY_ROLE):
                return a
    return find_artifact(manifest, target, QUANTIZATIONS[0])  # raises, listing what there is
