"""ONNX export of a run's model, with outputs `logits` and `embedding` and a checked parity with PyTorch.

The exporter is PyTorch's default since 2.9, the torch.export-based one (it needs onnxscript); the
TorchScript-based exporter is deprecated. The batch dimension is dynamic; the second output, the
penultimate features, lets drift monitoring work on ONNX models as it does on PyTorch ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from capas import atomic
from capas.data import Preprocess
from capas.errors import CapasError
from capas.models import CapasNet
from capas.predict import run_splits
from capas.runs import load_run, reading
from capas.spec import DataConfig

OPSET = 18
ATOL = RTOL = 1e-4  # parity: |onnx - torch| <= ATOL + RTOL * |torch|, elementwise, on logits and embeddings
PARITY_IMAGES = 256  # test images the parity check runs on


class _WithEmbedding(nn.Module):
    """CapasNet's forward and embed in one pass: (B, C, H, W) -> (logits (B, K), embedding (B, F))."""

    def __init__(self, model: CapasNet):
        super().__init__()
        modules = list(model.layers.values())
        last = max(i for i, m in enumerate(modules) if next(m.parameters(), None) is not None)
        backbone = [model.backbone] if model.backbone is not None else []  # (B, C, H, W) -> (B, C', h, w)
        self.features = nn.Sequential(*backbone, *modules[:last])
        self.head = nn.Sequential(*modules[last:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), features.flatten(1)


def export_onnx(model: CapasNet, path: str | Path, check: Callable[[Path], None] | None = None) -> Path:
    """Write `model` as ONNX (opset 18, dynamic batch), checked with onnx's checker; atomic.

    `check(file)`, given, runs on the written file before it is renamed onto `path`: a file that fails
    it (or an interrupt during it) leaves `path` as it was."""
    import onnx

    spec = model.spec
    height, width, channels = spec.input_shape
    wrapper = _WithEmbedding(model.cpu().eval()).eval()
    example = torch.zeros(2, channels, height, width)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not the user's
            program = torch.onnx.export(
                wrapper,
                (example,),
                input_names=["input"],
                output_names=["logits", "embedding"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        program.save(str(tmp), external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        if check is not None:
            check(tmp)

    try:
        return atomic.write_with(path, write)
    except torch.onnx.OnnxExporterError as error:  # its message: pages of the exporter's own report
        raise CapasError(
            f"{spec.name}: torch {torch.__version__}'s ONNX exporter cannot convert this model "
            f"({type(error).__name__}); a newer torch may: 2.14 converts every capas layer, 2.6 to 2.12 "
            "not GlobalMaxPooling2D"
        ) from None
    except onnx.checker.ValidationError as error:
        raise CapasError(f"{spec.name}: the exported ONNX graph fails onnx's checker: {error}") from None
    except OSError as error:  # a full disk, a folder that refuses the file
        raise CapasError(f"{path}: cannot write it ({error.strerror or error})") from None


@dataclass
class Parity:
    """How closely an ONNX model reproduces PyTorch on real images."""

    images: int
    max_abs_logits: float
    max_abs_embedding: float
    agreement: float  # fraction of images with the same predicted class
    within_tolerance: bool
    atol: float = ATOL
    rtol: float = RTOL


@torch.no_grad()
def parity(model: nn.Module, onnx_model, images: torch.Tensor, preprocess: Preprocess) -> Parity:
    """Compare `onnx_model` (an OnnxModel) with the PyTorch `model` on uint8 (N, C, H, W) images."""
    x = preprocess(images)
    want_logits, want_embedding = model.cpu().eval()(x), model.embed(x)
    got_logits, got_embedding = onnx_model(x), onnx_model.embed(x)
    close = torch.allclose(got_logits, want_logits, rtol=RTOL, atol=ATOL) and torch.allclose(
        got_embedding, want_embedding, rtol=RTOL, atol=ATOL
    )
    return Parity(
        images=len(x),
        max_abs_logits=(got_logits - want_logits).abs().max().item(),
        max_abs_embedding=(got_embedding - want_embedding).abs().max().item(),
        agreement=(got_logits.argmax(1) == want_logits.argmax(1)).float().mean().item(),
        within_tolerance=close,
    )


@dataclass
class ExportResult:
    path: Path
    bytes: int
    parity: Parity

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "parity": asdict(self.parity)}


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    data: DataConfig | None = None,
    data_dir: str | None = None,
) -> ExportResult:
    """Export a run directory's model to ONNX (default RUN/model.onnx) and check it on the test images of
    the run's dataset (its files looked for in `data_dir` if given), or of `data`.

    A result outside the tolerance is an error, and the file is removed: an export that changes the
    predictions is not an export.
    """
    from capas.runs import OnnxModel, check_not_in_another_run

    if out is not None:
        atomic.check_file_target(Path(out), "--out", "model.onnx")
        check_not_in_another_run(Path(out), run_dir)
        if Path(out).suffix != ".onnx":  # RUN/model.safetensors, a typo, replaced the run's own weights
            raise CapasError(
                f"--out {out}: an ONNX file must end in .onnx, e.g. {Path(out).with_suffix('.onnx')}"
            )
    out = Path(out) if out is not None else Path(run_dir) / "model.onnx"
    with reading(run_dir):
        run = load_run(run_dir)
        model = run.float_model("export")
        images = run_splits(run, data, data_dir).test.images[:PARITY_IMAGES]
        checks = []

        def check_parity(file: Path) -> None:  # before the file is put in place: an unchecked one never is
            check = parity(model, OnnxModel(file), images, run.preprocess)
            if not check.within_tolerance:
                raise CapasError(
                    f"{out}: ONNX Runtime's outputs differ from PyTorch's by up to {check.max_abs_logits:.2e} "
                    f"(logits) on {check.images} test images, beyond atol={ATOL}, rtol={RTOL}; the file was "
                    "not kept"
                )
            checks.append(check)

        export_onnx(model, out, check_parity)
    run.warn_exported(out)
    return ExportResult(out, out.stat().st_size, checks[0])
