"""Model runtimes for the exported query model: uint8 NHWC images -> float32 vectors.

``onnxruntime`` (default, torch-free; ``onnxruntime-ort`` is the same runtime on the bundle's
ORT-format copy, as a reduced mobile build would load it), ``executorch`` (optional: ``pip install
"cmce[executorch]"``; its Python bindings exchange torch tensors, so this backend imports
torch) and ``coreml`` (macOS only). Every backend runs the bundle artifact as it is: the app
does no maths (scaling, mean/std and normalisation are inside the model).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .bundle_format import Artifact
from .errors import BackendError

__all__ = ["BACKENDS", "BackendError", "Runtime", "check_backend", "open_runtime"]

#: backend -> the artifact target it runs
BACKENDS = {
    "onnxruntime": "onnx",
    "onnxruntime-ort": "ort",
    "executorch": "executorch",
    "coreml": "coreml",
}


class Runtime(ABC):
    """One loaded model. :meth:`run` checks input and output; backends fill in :meth:`_run`."""

    backend = ""

    def __init__(self, path: Path, artifact: Artifact, threads: int) -> None:
        self.path, self.artifact, self.threads = Path(path), artifact, threads
        fixed = artifact.input_shape[0]
        self.batch = None if fixed == -1 else fixed  # a fixed batch size (padded), or None
        self.max_batch = artifact.max_batch  # an upper bound on a dynamic batch, or None

    def __repr__(self) -> str:
        a = self.artifact
        return f"{type(self).__name__}({a.file!r}, {a.quantization}, threads={self.threads})"

    def run(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, dim) float32, in chunks the model takes."""
        a = self.artifact
        if images.dtype != np.uint8 or list(images.shape[1:]) != a.input_shape[1:]:
            raise ValueError(
                f"{a.file}: expects uint8 images of shape [N, "
                f"{', '.join(map(str, a.input_shape[1:]))}], got {images.dtype} "
                f"{list(images.shape)}"
            )
        x = images.astype(a.input_dtype)
        step = self.batch or self.max_batch or max(len(x), 1)
        parts = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            pad = (self.batch or len(chunk)) - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            parts.append(np.array(self._run(chunk)[: len(chunk) - pad], dtype=np.float32))
        out = np.concatenate(parts) if parts else np.zeros((0, a.output_shape[-1]), np.float32)
        if out.shape != (len(images), a.output_shape[-1]) or not np.isfinite(out).all():
            raise BackendError(
                f"{a.file}: the model returned {out.shape} (finite: "
                f"{bool(np.isfinite(out).all())}); expected "
                f"({len(images)}, {a.output_shape[-1]}) finite values"
            )
        return out

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The model on one batch in the artifact's input dtype."""


class OnnxRuntime(Runtime):
    """onnxruntime on the CPU, ``intra_op_num_threads = threads``."""

    backend = "onnxruntime"

    def __init__(self, path: Path, artifact: Artifact, threads: int) -> None:
        super().__init__(path, artifact, threads)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(
                "the onnxruntime backend needs onnxruntime: pip install "
                "onnxruntime (or pip install cmce)"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{artifact.file}: onnxruntime could not load it: {exc}") from exc
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if artifact.input_name not in inputs or artifact.output_name not in outputs:
            raise BackendError(
                f"{artifact.file}: the manifest names input "
                f"{artifact.input_name!r} and output {artifact.output_name!r}; "
                f"the model has inputs {inputs} and outputs {outputs}"
            )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        a = self.artifact
        return self._session.run([a.output_name], {a.input_name: batch})[0]


class ExecuTorchRuntime(Runtime):
    """ExecuTorch's Python runtime (``executorch.runtime``) on a ``.pte`` program."""

    backend = "executorch"

    def __init__(self, path: Path, artifact: Artifact, threads: int) -> None:
        super().__init__(path, artifact, threads)
        try:
            # ExecuTorch's Python runtime is built on torch (importing it loads torch) and
            # takes only torch tensors: the one backend that is not torch-free. On a phone,
            # the ExecuTorch C++ runtime runs the same .pte without torch.
            import torch
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime as ETRuntime
        except ImportError as exc:
            raise BackendError(
                'the executorch backend needs executorch: pip install "cmce[executorch]"'
            ) from exc
        self._torch = torch
        portable_lib._unsafe_reset_threadpool(threads)
        try:
            program = ETRuntime.get().load_program(Path(path))
            self._method = program.load_method("forward")
            bound = int(self._method.metadata.input_tensor_meta(0).sizes()[0])
        except Exception as exc:  # the bindings raise RuntimeError and others
            raise BackendError(f"{artifact.file}: ExecuTorch could not load it: {exc}") from exc
        if self.batch is None and self.max_batch is None:
            self.max_batch = bound  # the memory-planned upper bound of the dynamic batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self._method.execute([self._torch.from_numpy(np.ascontiguousarray(batch))])
        return out[0].numpy()


class CoreMLRuntime(Runtime):
    """Core ML through coremltools; prediction needs macOS."""

    backend = "coreml"

    def __init__(self, path: Path, artifact: Artifact, threads: int) -> None:
        super().__init__(path, artifact, threads)
        check_backend(self.backend)
        try:
            import coremltools as ct
        except ImportError as exc:
            raise BackendError(
                "the coreml backend needs coremltools: pip install coremltools"
            ) from exc
        try:
            self._model = ct.models.MLModel(str(path))
        except Exception as exc:  # coremltools raises several types
            raise BackendError(f"{artifact.file}: Core ML could not load it: {exc}") from exc

    def _run(self, batch: np.ndarray) -> np.ndarray:
        a = self.artifact
        return self._model.predict({a.input_name: batch})[a.output_name]


_CLASSES: dict[str, type[Runtime]] = {
    "onnxruntime": OnnxRuntime,
    "onnxruntime-ort": OnnxRuntime,
    "executorch": ExecuTorchRuntime,
    "coreml": CoreMLRuntime,
}


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or one that cannot run on this platform, before any loading."""
    if backend not in _CLASSES:
        raise BackendError(f"unknown backend {backend!r}; choose one of {sorted(_CLASSES)}")
    if backend == "coreml" and sys.platform != "darwin":
        raise BackendError(
            f"the coreml backend runs only on macOS (Core ML is an Apple "
            f"framework); this is {sys.platform}: use backend='onnxruntime' "
            "or 'executorch'"
        )


def open_runtime(backend: str, path: Path, artifact: Artifact, threads: int = 1) -> Runtime:
    """Load ``path`` (already verified against ``artifact``) with ``backend``."""
    check_backend(backend)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if BACKENDS[backend] != artifact.target:
        raise BackendError(
            f"backend {backend!r} runs {BACKENDS[backend]} artifacts, "
            f"{artifact.file} is {artifact.target}"
        )
    return _CLASSES[backend](path, artifact, threads)
