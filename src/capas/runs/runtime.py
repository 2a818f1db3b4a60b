"""ONNX Runtime models behind the interface the rest of capas uses from `run.model`.

An int8 run directory holds `model.onnx` (declared in `runtime.json`) instead of safetensors weights;
`load_run` wraps it in `OnnxModel` so that evaluate, predict and serve treat it like a `CapasNet`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from capas.errors import CapasError

RUNTIME = "runtime.json"  # {"runtime": "onnxruntime", "model": "model.onnx"}


def read_runtime(path: Path) -> dict | None:
    """runtime.json of a run directory, validated; None when the run holds PyTorch weights."""
    if not path.is_file():
        return None
    try:
        runtime = json.loads(path.read_text())
        ok = runtime["runtime"] == "onnxruntime" and isinstance(runtime["model"], str)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok or Path(runtime["model"]).name != runtime["model"]:
        raise CapasError(
            f'{path}: expected {{"runtime": "onnxruntime", "model": "<file in the run directory>"}}'
        )
    return runtime


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session; unreadable or invalid files are a CapasError naming the file."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CapasError("ONNX models need onnxruntime: pip install 'capas[compress]'") from None
    options = ort.SessionOptions()
    # The same thread count PyTorch uses, so latency comparisons between the two runtimes are fair;
    # one inter-op thread: these graphs are chains, there is nothing to run side by side.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # No busy-waiting between calls: spinning threads would take the cores from PyTorch (measured side by
    # side) or from the server's other work, for a gain of microseconds.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/… types, none a common base
        raise CapasError(f"{path}: not a loadable ONNX model ({str(error).splitlines()[0]})") from None


class OnnxModel:
    """An ONNX graph with outputs `logits` and `embedding`, called like `CapasNet` (CPU only)."""

    training = False  # inference only; `evaluate` reads and restores this
    device = torch.device("cpu")

    def __init__(self, path: str | Path, threads: int | None = None, expect: tuple[tuple, int] | None = None):
        """`expect`: the spec's (H, W, C) input shape and the number of classes the graph must match."""
        self.path = Path(path)
        self.session = session(self.path, threads)
        outputs = self.session.get_outputs()
        if [o.name for o in outputs][:2] != ["logits", "embedding"]:
            raise CapasError(
                f"{self.path}: expected outputs logits and embedding, found {', '.join(o.name for o in outputs)}"
            )
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        if expect is not None:
            (height, width, channels), classes = expect
            found = (tuple(graph_input.shape[1:]), outputs[0].shape[1])
            if found != ((channels, height, width), classes):
                raise CapasError(
                    f"{self.path}: the graph takes {found[0]} and gives {found[1]} classes, but model.json and "
                    f"preprocess.json say {(channels, height, width)} and {classes}: the run directory was tampered with"
                )

    def _run(self, output: str, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())  # (B, C, H, W)
        return torch.from_numpy(self.session.run([output], {self.input_name: array})[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes) logits
        return self._run("logits", x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, F) penultimate features
        return self._run("embedding", x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise CapasError(
                f"{self.path}: an ONNX Runtime model cannot be trained; fine-tune the float run instead"
            )
        return self

    def to(self, device: str | torch.device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise CapasError(f"{self.path}: ONNX runs execute on the CPU only, not on {device}")
        return self
