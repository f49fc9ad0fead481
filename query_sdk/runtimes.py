"""Model runtimes for the exported query model: uint8 NHWC images -> float32 vectors.

``onnxruntime`` (default, torch-free; ``onnxruntime-ort`` is the same runtime on the bundle's
ORT-format copy, as a reduced mobile build would load it), ``executorch`` (optional: ``pip install
"cmce[executorch]"``; its Python bindings exchange torch tensors, so this backend imports
torch) and ``coreml`` (macOS only). Every backend runs the bundle artifact as it is: the app
does no maths (scaling, mean/std and normalisation are inside the model).

Opening a runtime checks the model against the bundle manifest before the first call: ONNX
input/output names, dtypes and shapes; an ExecuTorch program's frame, and one guarded load
and run in a child process (see :class:`ExecuTorchRuntime`). A mismatch is a BackendError
naming the file, what the manifest says and what the model takes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .bundle_format import QUERY_ROLE, Artifact
from .errors import BackendError
from .fileio import read_regular_file

__all__ = ["BACKENDS", "BackendError", "Runtime", "check_backend", "check_pte", "open_runtime"]

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
        """(N, H, W, C) uint8 images (a gallery head: (N, d) raw embeddings in its input
        dtype) -> (N, dim) float32, in chunks the model takes."""
        a = self.artifact
        want = np.dtype(np.uint8 if a.role == QUERY_ROLE else a.input_dtype)
        if images.dtype != want or list(images.shape[1:]) != a.input_shape[1:]:
            raise ValueError(
                f"{a.file}: expects {want} inputs of shape [N, "
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
        self._check_session()

    def _check_session(self) -> None:
        """The session's one input and its output are what the manifest says: names, dtypes,
        shapes (a symbolic dimension takes any size; a fixed one must be the manifest's)."""
        a = self.artifact
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if list(inputs) != [a.input_name] or a.output_name not in outputs:
            raise BackendError(
                f"{a.file}: the manifest names input {a.input_name!r} and output "
                f"{a.output_name!r}; the model has inputs {list(inputs)} and outputs "
                f"{list(outputs)} (re-export the bundle with cmce-export)"
            )
        x, y = inputs[a.input_name], outputs[a.output_name]
        problems = []
        if _ORT_DTYPES.get(x.type) != a.input_dtype:
            problems.append(f"input {x.name!r} is {x.type}, the manifest says {a.input_dtype}")
        if _ORT_DTYPES.get(y.type) not in ("float32", "float16"):
            problems.append(f"output {y.name!r} is {y.type}, the manifest says float32")
        for kind, node, want in (("input", x, a.input_shape), ("output", y, a.output_shape)):
            if not _shape_fits(node.shape, want):
                problems.append(
                    f"{kind} {node.name!r} has shape {list(node.shape)}, the manifest says {want}"
                )
        if problems:
            raise BackendError(
                f"{a.file}: the model does not take what the manifest says: "
                f"{'; '.join(problems)} (re-export the bundle with cmce-export)"
            )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        a = self.artifact
        return self._session.run([a.output_name], {a.input_name: batch})[0]


#: onnxruntime's type names -> the manifest's dtypes
_ORT_DTYPES = {
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
}


def _shape_fits(model: list, manifest: list[int]) -> bool:
    """A model's shape (ints, or names/None for symbolic dimensions) fits the manifest's
    (-1 = any size): same rank, and every fixed model dimension is the manifest's."""
    return len(model) == len(manifest) and all(
        not isinstance(m, int) or m == w for m, w in zip(model, manifest, strict=True)
    )


#: bytes 4-7 of every ExecuTorch program (the flatbuffer file identifier of program.fbs)
PTE_IDENTIFIER = b"ET12"
_PTE_HEADER_MAGIC = b"eh00"  # the optional extended header at byte 8
_CHILD_TIMEOUT = 300.0
#: sha256 of programs that loaded and ran in a child process (this process need not again)
_PROVEN: set[str] = set()
#: the parent's own path (executorch.runtime: load_program, load_method, metadata, execute)
_CHILD = """
import hashlib, sys
data = open(sys.argv[1], "rb").read()
import numpy as np, torch
from executorch.runtime import Runtime
program = Runtime.get().load_program(data)
method = program.load_method("forward")
method.metadata.input_tensor_meta(0).sizes()
shape, dtype = [int(v) for v in sys.argv[2].split(",")], sys.argv[3]
method.execute([torch.from_numpy(np.zeros(shape, dtype=dtype))])
print(hashlib.sha256(data).hexdigest())
"""


def check_pte(data: bytes, file: str) -> None:
    """The frame of an ExecuTorch program, before ExecuTorch sees a byte: the file
    identifier, the flatbuffer root offset and the extended header's sizes within the file.

    ExecuTorch 1.5 logs a bad identifier with the raw bytes in its message, and its Python
    bindings abort the process (SIGABRT) on the non-UTF-8 text: this turns that into a
    BackendError.
    """
    if len(data) < 16:
        raise BackendError(f"{file}: {len(data)} bytes, too short for an ExecuTorch program")
    if data[4:8] != PTE_IDENTIFIER:
        raise BackendError(
            f"{file}: not an ExecuTorch program: bytes 4-7 are {data[4:8].hex()}, expected "
            f"{PTE_IDENTIFIER.hex()} ({PTE_IDENTIFIER.decode()}); re-export it with cmce-export"
        )
    root = int.from_bytes(data[0:4], "little")
    if not 8 <= root < len(data):
        raise BackendError(f"{file}: flatbuffer root offset {root} outside the {len(data)} bytes")
    if data[8:12] != _PTE_HEADER_MAGIC or len(data) < 32:
        return
    length = int.from_bytes(data[12:16], "little")
    program = int.from_bytes(data[16:24], "little")
    base = int.from_bytes(data[24:32], "little")
    segments = int.from_bytes(data[32:40], "little") if length > 24 and len(data) >= 40 else 0
    if length < 24 or program > len(data) or base > len(data) or base + segments > len(data):
        raise BackendError(
            f"{file}: the extended header claims {program} program bytes and segments at "
            f"{base}+{segments}; the file has {len(data)} bytes (truncated or crafted)"
        )


class _GuardedLoad:
    """A child process that loads a program and runs one batch of zeros, started before the
    parent imports ExecuTorch so that the two overlap; an abort or hang there is a
    BackendError here. Proven programs (by sha256) are not run again in this process."""

    def __init__(self, path: Path, data: bytes, artifact: Artifact, batch: int) -> None:
        self.file, self.digest = artifact.file, hashlib.sha256(data).hexdigest()
        self.child = None
        if self.digest not in _PROVEN:
            shape = ",".join(map(str, [batch, *artifact.input_shape[1:]]))
            self.child = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHILD, str(path), shape, artifact.input_dtype],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )

    def cancel(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.communicate()

    def wait(self) -> None:
        if self.child is None:
            return
        try:
            out, err = self.child.communicate(timeout=_CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise BackendError(
                f"{self.file}: ExecuTorch did not load and run it within {_CHILD_TIMEOUT:.0f} s"
            ) from None
        lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines()]
        last = next((ln for ln in reversed(lines) if ln), "no message")
        code = self.child.returncode
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            raise BackendError(
                f"{self.file}: ExecuTorch aborted ({name}) loading it, a "
                f"malformed or crafted program ({last}); re-export it with cmce-export"
            )
        if code:
            raise BackendError(f"{self.file}: ExecuTorch could not load and run it: {last}")
        if out.decode("utf-8", "replace").split()[-1:] != [self.digest]:
            raise BackendError(f"{self.file}: the file changed while it was being loaded")
        _PROVEN.add(self.digest)


class ExecuTorchRuntime(Runtime):
    """ExecuTorch's Python runtime (``executorch.runtime``) on a ``.pte`` program.

    A crafted program can abort the process from inside ExecuTorch (its bindings terminate on
    non-UTF-8 bytes in a log message: a bad identifier, an operator or backend name), past
    the flatbuffer verification it runs, so no pre-check can be complete. Both, then: the
    program's frame is checked (:func:`check_pte`, clear messages for the common damage),
    and the first load of a program in a process happens in a child process that loads it
    and runs one batch, where an abort is a BackendError. The child imports ExecuTorch while
    this process does (they overlap); it reports the sha256 of what it ran, and this process
    loads those same bytes, read once. The phone's C++ runtime does not have the
    bindings' abort; there the bundle's sha256 and signature are the guard.
    """

    backend = "executorch"

    def __init__(self, path: Path, artifact: Artifact, threads: int) -> None:
        super().__init__(path, artifact, threads)
        data = read_regular_file(path, artifact.bytes, "ExecuTorch program", BackendError)
        check_pte(data, artifact.file)
        guard = _GuardedLoad(path, data, artifact, self.batch or 1)
        try:
            # ExecuTorch's Python runtime is built on torch (importing it loads torch) and
            # takes only torch tensors: the one backend that is not torch-free. On a phone,
            # the ExecuTorch C++ runtime runs the same .pte without torch.
            import torch
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime as ETRuntime
        except ImportError as exc:
            guard.cancel()
            raise BackendError(
                'the executorch backend needs executorch: pip install "cmce[executorch]"'
            ) from exc
        guard.wait()
        self._torch = torch
        portable_lib._unsafe_reset_threadpool(threads)
        try:
            # kept: the method reads the bytes the Program holds (dropped, it segfaults)
            self._program = ETRuntime.get().load_program(data)
            self._method = self._program.load_method("forward")
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
    """Load ``path`` (already verified against ``artifact``) with ``backend``; ``threads``
    above the machine's CPU count are clamped to it (more would only cost memory)."""
    check_backend(backend)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    threads = min(threads, os.cpu_count() or 1)
    if BACKENDS[backend] != artifact.target:
        raise BackendError(
            f"backend {backend!r} runs {BACKENDS[backend]} artifacts, "
            f"{artifact.file} is {artifact.target}"
        )
    return _CLASSES[backend](path, artifact, threads)
