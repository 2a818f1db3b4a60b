"""Writing and loading run directories: everything needed to evaluate, predict with or serve a trained model, and nothing pickled.

RUN/
  model.json          the spec, in Keras' vocabulary (the architecture)
  model.safetensors   the weights
  preprocess.json     classes and the preprocessing inference must apply
  config.json         the resolved data and training configs, splits, environment
  metrics.jsonl       one line of metrics per epoch
  summary.txt         the Keras-style summary
  test.json           final test loss, accuracy, per-class accuracy, confusion matrix
  reference.safetensors  a sample of validation images' penultimate features and input
                      statistics: the reference that drift monitoring compares live traffic to

A run made by `capas compress --quantize` holds an ONNX graph instead of model.safetensors, declared in
runtime.json ({"runtime": "onnxruntime", "model": "model.onnx"}); its model.json then describes the
float architecture the graph was quantized from.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import reprlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import capas
from capas import atomic
from capas.cpu import available_cores, cpu_features, cpu_model, describe
from capas.data import ArrayDataset, Preprocess
from capas.errors import CapasError, first_of
from capas.inference import TTA_MODES
from capas.lock import LOCK, exclusive, holding
from capas.models import CapasNet, build_model
from capas.models.weights import load_checked
from capas.runs.reference import REFERENCE, save_reference
from capas.runs.runtime import RUNTIME, OnnxModel, read_runtime
from capas.spec import ModelSpec, load_spec
from capas.spec.backbone import RUN
from capas.spec.io import load_document, parse_config
from capas.spec.summary import summarize

REQUIRED = ("model.json", "model.safetensors", "preprocess.json")
CHECKPOINT = "checkpoint.safetensors"  # an unfinished training's state (capas.train.checkpoint)
# Every file a run directory may hold: write_run's, an unfinished training's checkpoint and lock, what
# compress writes into its own run, and the exports' default files, which derive from the weights (a
# run trained again replaces them with the rest). Anything else in the folder is not the run's.
RUN_FILES = frozenset(
    {
        *REQUIRED,
        *("config.json", "metrics.jsonl", "summary.txt", "test.json", RUNTIME, REFERENCE, CHECKPOINT),
        *("lineage.json", "compress.json", "compress.md", "model.onnx", "model.keras", LOCK),
    }
)


def environment() -> dict:
    """The machine and library versions, recorded beside every figure."""
    return {
        "capas": capas.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": available_cores(),
        "threads": torch.get_num_threads(),  # PyTorch's intra-op threads in this process
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,  # the current GPU
        "cpu_features": cpu_features(),  # AVX-512, AVX512-BF16, AMX: what bfloat16 runs on
    }


def machine_line(env: dict | None = None) -> str:
    """The line a benchmark prints under its table: machine, threads, versions, what bfloat16 runs on."""
    env = env or environment()
    return (
        f"machine: {env['processor']}, {env['cpu_count']} cores, {env['threads']} threads "
        f"({torch.get_num_interop_threads()} interop), "
        f"{platform.system()}; torch {env['torch']}, python {env['python']}, capas {env['capas']}; "
        f"{describe(env['cpu_features'])}; cuda: {env['cuda'] or 'none'}"
    )


def save_weights(path: Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load safetensors weights, naming missing, unexpected and mis-shaped tensors if they do not fit."""
    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise CapasError(f"{path}: unreadable weights file ({error})") from None
    load_checked(model, tensors, f"{path}: the weights do not fit the architecture in model.json")


@dataclass
class Run:
    """A run directory loaded back: the model (in eval mode), its preprocessing and class names."""

    path: Path
    spec: ModelSpec
    model: CapasNet | OnnxModel
    preprocess: Preprocess
    classes: tuple[str, ...]
    precision: str = "float32"  # the training's precision (config.json), kept for prediction
    tta: str = "none"  # the training's test-time augmentation (config.json), applied by predict and serve
    channels_last: bool = False  # the training's memory format (config.json), which evaluate_run re-scores in

    def read_json(self, name: str) -> dict | None:
        file = self.path / name
        return json.loads(file.read_text()) if file.exists() else None

    def float_model(self, doing: str) -> CapasNet:
        """The run's PyTorch model; a CapasError for a run of an ONNX Runtime graph (a quantized run),
        which export and compression cannot start from: `doing` names the command ("export")."""
        if not isinstance(self.model, CapasNet):
            raise CapasError(
                f"{self.path}: an ONNX Runtime run ({self.model.path.name}); {doing} its float source instead"
            )
        return self.model

    def warn_exported(self, file: Path) -> None:
        """Warn when `file`, an export of this run's model (one float32 forward pass), computes less
        than capas' own predictions do: a user serving it would get other probabilities, unsaid."""
        missing = [f"{self.tta} test-time augmentation"] if self.tta != "none" else []
        missing += ["bfloat16 autocast"] if self.precision == "bfloat16" else []
        if missing:
            warnings.warn(
                f"{file} is one float32 forward pass of the model, without the run's {' or '.join(missing)}, "
                "which capas evaluate, predict and serve apply: its outputs differ from theirs",
                stacklevel=3,  # the caller of the export
            )


def _json_object(file: Path) -> dict:
    """A JSON file of a run directory that holds an object; anything else is a CapasError naming it."""
    data = load_document(file)
    if not isinstance(data, dict):
        raise CapasError(f"{file}: damaged, expected a JSON object, got {reprlib.repr(data)}")
    return data


def _read_spec(file: Path) -> ModelSpec:
    """model.json; every message names the file."""
    try:
        return load_spec(file, saved=True)
    except CapasError as error:
        # from_dict names its source before the document's own keys but not before a layer's
        # message ("layer 0 (Conv2D): …"), which study messages embed as it is
        message = str(error)
        raise CapasError(message if message.startswith(f"{file}: ") else f"{file}: {message}") from None


def _read_preprocess(file: Path, spec: ModelSpec) -> tuple[Preprocess, tuple[str, ...]]:
    """preprocess.json, checked against model.json: one class name per output, and the input size
    and channels the model takes."""
    meta = _json_object(file)
    preprocess = parse_config(Preprocess, meta.get("preprocess"), f"{file}: preprocess")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise CapasError(
            f"{file}: 'classes' must be a list of class names (strings), one per output of the model, "
            f"got {reprlib.repr(classes)}"
        )
    if spec.output_shape != (len(classes),):
        outputs = spec.output_shape[0] if len(spec.output_shape) == 1 else spec.output_shape
        raise CapasError(
            f"{file}: {len(classes)} class names for a model with {outputs} outputs (model.json); "
            "'classes' needs one name per output"
        )
    height, width, channels = spec.input_shape
    if preprocess.size != (height, width) or preprocess.channels != channels:
        raise CapasError(
            f"{file}: size {list(preprocess.size)} and channels {preprocess.channels} do not match "
            f"model.json's input_shape {list(spec.input_shape)}; they must be its [height, width] and channels"
        )
    return preprocess, tuple(classes)


def _read_inference(config: dict, file: Path) -> tuple[str, str, bool]:
    """(precision, tta, channels_last) of the training that config.json (`file`, read as `config`)
    records, which prediction repeats; without the file or its train section (an imported run):
    float32, no TTA."""
    train = config.get("train") or {}
    if not isinstance(train, dict):
        raise CapasError(
            f"{file}: 'train' must be a mapping (the training config), got {reprlib.repr(train)}"
        )
    precision = train.get("precision", "float32")
    if precision not in ("float32", "bfloat16"):
        raise CapasError(f"{file}: train.precision {reprlib.repr(precision)} is not float32 or bfloat16")
    tta = train.get("tta", "none")
    if tta not in TTA_MODES:
        raise CapasError(f"{file}: train.tta {reprlib.repr(tta)} is not one of {', '.join(TTA_MODES)}")
    return precision, tta, bool(train.get("channels_last", False))


def architecture_digest(run_dir: str | Path) -> str:
    """The sha256 of a run's model.json: what a run built on it (`backbone: {name: run}`) takes its
    layers' architecture from, each time it loads (its own weights file holds only their weights)."""
    try:
        return hashlib.sha256((Path(run_dir) / "model.json").read_bytes()).hexdigest()
    except OSError as error:
        raise CapasError(f"{run_dir}: cannot read its model.json ({error.strerror or error})") from None


def _check_backbone_run(path: Path, spec: ModelSpec, config: dict) -> None:
    """A run built on another run's layers loads only while that run's architecture is the one it
    trained on (config.json records its digest): retrained in place (another activation, the same
    shapes), it would silently compute something else."""
    if spec.backbone is None or spec.backbone.name != RUN:
        return
    recorded = config.get("backbone_run")
    if not isinstance(recorded, dict) or "model_json_sha256" not in recorded:
        return  # a run of an older capas, which did not record it
    if architecture_digest(spec.backbone.weights) != recorded["model_json_sha256"]:
        raise CapasError(
            f"{path}: its backbone run {spec.backbone.weights} has changed since this run trained on it (its "
            "model.json is another file now), and this run's layers are built from it: restore that run, or "
            "train this one again"
        )


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Load a run directory; an incomplete or tampered directory is a CapasError that names the problem
    and the file that holds it.

    A run declaring an ONNX model in runtime.json loads as an `OnnxModel`, on the CPU whatever `device`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CapasError(f"{path}: not a run directory ({'a file' if path.exists() else 'no such folder'})")
    runtime = read_runtime(path / RUNTIME)
    required = REQUIRED if runtime is None else ("model.json", "preprocess.json", runtime["model"])
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CapasError(f"{path}: incomplete run directory, missing {', '.join(missing)}")
    spec = _read_spec(path / "model.json")
    config = _json_object(path / "config.json") if (path / "config.json").is_file() else {}
    _check_backbone_run(path, spec, config)
    preprocess, classes = _read_preprocess(path / "preprocess.json", spec)
    precision, tta, channels_last = _read_inference(config, path / "config.json")
    if runtime is not None:
        model = OnnxModel(path / runtime["model"], expect=(spec.input_shape, len(classes)))
        return Run(path, spec, model, preprocess, classes, tta=tta)
    model = build_model(spec, pretrained=False)  # the run's weights replace any pretrained ones
    load_weights(path / "model.safetensors", model)
    return Run(path, spec, model.to(device).eval(), preprocess, classes, precision, tta, channels_last)


def write_run(
    path: Path,
    *,
    spec: ModelSpec,
    model: torch.nn.Module | OnnxModel,
    preprocess: Preprocess,
    classes: tuple[str, ...],
    config: dict,
    history: list[dict] | None,
    test: dict | None,
    reference: ArrayDataset | None = None,
    precision: str = "float32",
    summary_note: str = "",
) -> None:
    """Write every file of a run directory, each atomically; test.json goes last.

    `model`: a PyTorch module (its weights go to model.safetensors) or an `OnnxModel` whose graph
    already lies in `path` (runtime.json then declares it). `reference`: validation images whose
    features become the drift reference, computed in `precision`. `history`: None writes no
    metrics.jsonl (nothing was trained). `summary_note` goes above the summary in summary.txt.
    """
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, OnnxModel) and model.path.parent.resolve() != path.resolve():
        raise ValueError(f"the ONNX graph {model.path} must lie in the run directory {path}")
    atomic.write_json(path / "model.json", spec.to_dict())
    atomic.write_json(
        path / "preprocess.json", {"classes": list(classes), "preprocess": preprocess.model_dump(mode="json")}
    )
    atomic.write_json(path / "config.json", {**config, "environment": environment()})
    if history is not None:
        atomic.write_text(path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    atomic.write_text(path / "summary.txt", summary_note + summarize(spec).text())
    if isinstance(model, OnnxModel):
        atomic.write_json(path / RUNTIME, {"runtime": "onnxruntime", "model": model.path.name})
    else:
        save_weights(path / "model.safetensors", model)
    if reference is not None:
        save_reference(path / REFERENCE, model, reference, preprocess, precision)
    if test is not None:
        atomic.write_json(path / "test.json", test)


def not_the_runs(folder: Path) -> list[str]:
    """The names in `folder` that are not a run's (RUN_FILES), nor the hidden temporary of one's
    atomic write that a killed command left (.NAME.XXXXXXXX.tmp: the next write of NAME deletes it)."""
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name not in RUN_FILES
        and not any(entry.name.startswith(atomic.hidden_prefix(name)) for name in RUN_FILES)
    )


def check_not_in_another_run(path: Path, run_dir: str | Path | None = None, what: str = "--out") -> None:
    """Refuse a path inside a run directory other than `run_dir` (None: inside any run): it would
    replace that run's files (an export written over an int8 run's model.onnx made it a float model),
    or be a run inside a run."""
    folder = path.parent
    if (folder / "model.json").is_file() and (run_dir is None or folder.resolve() != Path(run_dir).resolve()):
        raise CapasError(
            f"{what} {path}: inside the run directory {folder}, whose files only its own commands write; "
            "choose a path outside it"
        )


def check_not_in_images(out: Path, dataset: str | None) -> None:
    """Refuse a run directory inside the image folder of a `folder:` dataset: the run would become a
    class of its own (without images), and the dataset, refused then, could train or score nothing."""
    if dataset is None or not dataset.startswith("folder:"):
        return
    images = Path(dataset.removeprefix("folder:")).expanduser().resolve()
    if out.resolve().is_relative_to(images):
        raise CapasError(
            f"{out}: inside the image folder {images} of the run's data, whose <class>/<image> layout the "
            "run directory would break: choose an --out outside it"
        )


def check_not_cwd(out: Path) -> None:
    """Refuse the current folder as a run directory: staging replaces its folder whole, which would leave
    the shell in a deleted folder (`--out .`, or `--out ''`, which Typer reads as '.')."""
    if out.resolve() == Path.cwd().resolve():
        raise CapasError(
            f"{out}: the current folder; the finished run replaces its folder whole: choose another "
            "--out, such as runs/<name>"
        )


def reading(run_dir: str | Path) -> contextlib.AbstractContextManager:
    """A shared hold on the run directory's lock (capas.lock) while a command reads the run and writes
    what it derives from it (an export, a compressed run). A `capas train --out` the folder holds the lock
    exclusively and replaces the folder whole when it ends: it is refused meanwhile, and refuses the
    command while it trains, which would otherwise mix the two runs (an export of the old model written
    into the new run; a lineage.json naming the new weights for a model compressed from the old ones).
    Commands that read may run together. Hold it from before the run is loaded."""
    run_dir = Path(run_dir)
    return exclusive(run_dir, "run directory", shared=True) if run_dir.is_dir() else contextlib.nullcontext()


@contextlib.contextmanager
def staging(out: Path, replace: bool = True) -> Iterator[Path]:
    """A hidden folder beside `out`, renamed onto it when complete: a crash never leaves half a run.

    An `out` that exists (a run being retrained: its old run, its lock and checkpoint) stays whole
    until the new run is: it is renamed aside, the new folder onto `out`, then the old one deleted.
    A kill -9 between the two renames leaves no `out` but both runs whole beside it, as .NAME.*
    folders (Ctrl-C or SIGTERM there puts the old run back, the next command that writes `out` does:
    `recover`); never a folder that mixes files of two runs. An `out` that is a symbolic link is the folder it points to: that is replaced, and the link
    keeps pointing at the run.

    `replace=False` (compress, import-keras: their `out` did not exist when they started) keeps a
    folder that another command put at `out` meanwhile, and discards the new run with a CapasError."""
    check_not_cwd(out)
    out = out.resolve()  # a link itself cannot be renamed onto mkdtemp's folder
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=atomic.hidden_prefix(out.name), dir=out.parent))
    except OSError as error:  # a file where a folder should be, a read-only folder, /proc…
        raise CapasError(
            f"{out}: cannot create the run directory ({error.strerror or error}: {error.filename})"
        ) from None
    with holding(tmp):  # a live command's folder: `recover` leaves it alone
        old = None
        try:
            yield tmp
            os.chmod(
                tmp, 0o777 & ~atomic.umask()
            )  # mkdtemp makes 0700 folders; give the permissions mkdir would
            if replace and out.exists():
                old = Path(tempfile.mkdtemp(prefix=atomic.hidden_prefix(out.name) + "old-", dir=out.parent))
                os.rename(out, old)  # onto the empty folder mkdtemp made: a unique name, atomically
            try:
                os.rename(tmp, out)  # onto nothing or an empty folder; anything else fails, atomically
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                raise CapasError(
                    f"{out}: appeared while this command ran (another command writing it?) and is left as it "
                    "is; nothing was written: rerun with another --out"
                ) from None
            atomic.sync_folder(out.parent)  # the files inside were flushed as written; this keeps the renames
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except CapasError as error:  # a full disk: name the file the user asked for, not its hidden folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise CapasError(str(error).replace(str(tmp), str(out))) from None
        except BaseException:  # Ctrl-C, SIGTERM
            if old is not None and not out.exists():  # between the two renames: the old run goes back
                os.rename(old, out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _holds_anything(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError:  # unreadable: what it holds cannot be told, so it counts
        return True


def recover(out: Path) -> None:
    """Put right what a command killed while it staged `out` (kill -9, a power loss, the OOM killer) left
    beside it, before a command writes `out` again, and say what was done in one warning. With no `out`,
    a run moved aside (.NAME.old-*: the kill came between `staging`'s two renames) is moved back, as
    Ctrl-C there does: a retrained run's checkpoint in it resumes. The folders a new run was written in
    (.NAME.*), which never became `out`, are deleted: what they were made from is kept (the checkpoint,
    the source run or file); so is a run moved aside once `out` holds a finished run (the kill came
    while it was deleted). Folders a live command holds are left alone, and so is everything where
    that cannot be told, or where the name is cut short (`hidden_prefix`: other runs' share it)."""
    given, out = out, out.resolve()  # a link: the folder it points to is staged (`staging`)
    found = atomic.abandoned(out, r"(old-)?[a-z0-9_]{8}")
    prefix = atomic.hidden_prefix(out.name)
    # not the empty folder a kill before staging's first rename left: it is no run, and two would
    # leave the one that is aside
    aside = [path for path in found if path.name.startswith(f"{prefix}old-") and _holds_anything(path)]
    done = []
    if len(aside) == 1 and not out.exists():
        with contextlib.suppress(OSError):  # `out` appeared meanwhile: the run stays aside
            os.rename(aside[0], out)
            done.append(f"moved back the run a killed command had moved aside ({aside[0].name})")
            atomic.sync_folder(out.parent)
    finished = (out / "model.json").is_file()
    stale = [path for path in found if path.exists() and (path not in aside or finished)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if removed := [path.name for path in stale if not path.exists()]:
        done.append(f"deleted the hidden folders killed commands left beside it ({first_of(removed, 3)})")
    if done:
        warnings.warn(f"{given}: {'; '.join(done)}", stacklevel=3)
