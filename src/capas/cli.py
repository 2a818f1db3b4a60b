"""The `capas` command: thin Typer commands over the library functions."""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from capas.deploy.serve.options import ServeOptions
from capas.deploy.settings import COMPRESS, CompressSettings
from capas.errors import CapasError, Terminated, closest
from capas.spec.train import TrainConfig, best_epoch

app = typer.Typer(
    help="capas: build convolutional networks from Keras' layers, train them, and measure what each layer does.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(emoji=False)  # a name read from a file may hold :smile:, which Rich would replace
errors = Console(stderr=True, emoji=False)


def _version(value: bool) -> None:
    if value:
        from capas import __version__

        console.print(f"capas {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print capas' version and exit."),
    ] = False,
) -> None:
    pass


def _shown(text: str) -> str:
    """`text` to print as it is: Rich markup escaped, and control characters shown as escapes (\\x1b),
    never sent to the terminal: names read from files and folders someone else made (a Keras layer's
    class, a class folder) can hold sequences that clear the screen or retitle the window."""
    return escape("".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text))


def _show_warning(default, message, category, filename, lineno, file=None, line=None) -> None:
    """capas' own warnings (a folder's decoded images that could not be cached) as one line, as the
    commands' other warnings, not as Python shows them: with capas' file, line number and source line.
    Other libraries' warnings keep Python's format."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        errors.print(f"[bold yellow]warning:[/] {_shown(str(message))}", highlight=False, soft_wrap=True)
    else:
        default(message, category, filename, lineno, file, line)


def _terminate(signum, frame) -> None:
    raise Terminated


def friendly(command):
    """User mistakes (CapasError) print one clear message and exit with status 2, never a traceback.
    Ctrl-C and SIGTERM print one line and exit with 130 and 143 (128 + the signal's number), as a shell
    reports a process the signal ended."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        # Python runs signal handlers in the main thread, and only between bytecodes: one rank of several
        # (WORLD_SIZE, as capas.train.distributed.launched reads it) blocked in a collective would never
        # run it, and its launcher would wait for it; ranks keep SIGTERM's default, to end at once.
        handles = (
            threading.current_thread() is threading.main_thread()
            and int(os.environ.get("WORLD_SIZE", "1")) < 2
        )
        previous = signal.signal(signal.SIGTERM, _terminate) if handles else None
        try:
            with warnings.catch_warnings():
                warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
                return command(*args, **kwargs)
        except CapasError as error:
            # escaped: messages quote user input and commands such as pip install 'capas[ray]'
            errors.print(f"[bold red]error:[/] {_shown(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as stop:
            if command.__name__ in ("train", "study"):  # they keep checkpoints and finished runs
                errors.print("interrupted; finished work is kept, rerun the same command to resume")
            else:  # the others write their outputs whole or not at all
                errors.print("interrupted; nothing was written")
            raise typer.Exit(
                128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
            ) from None
        except OSError as error:
            if error.filename is None and error.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
                # the output itself cannot be written (`capas info > /dev/full`, a full disk): stdout
                # goes to /dev/null, so that Python's own flush at exit does not fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                errors.print(
                    f"[bold red]error:[/] cannot write the output ({error.strerror})", soft_wrap=True
                )
                raise typer.Exit(1) from None
            if error.errno != errno.ENAMETOOLONG:
                raise
            # a path option, or a spec's name as runs/<name>, longer than a file name may be
            errors.print(
                f"[bold red]error:[/] {_shown(f'{error.filename}: {error.strerror}')}", soft_wrap=True
            )
            raise typer.Exit(2) from None
        except (MemoryError, RuntimeError) as error:
            # a spec or batch too large for this machine: torch's allocators raise RuntimeErrors
            # (torch.OutOfMemoryError on a GPU, "can't allocate memory" on a CPU)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if not isinstance(error, MemoryError) and not re.search(
                r"out of memory|can't allocate memory", first
            ):
                raise
            errors.print(
                f"[bold red]error:[/] out of memory ({_shown(first[:300])}); lower the batch size, the "
                "input size or the model's width",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        finally:
            if handles:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


DeviceOpt = Annotated[
    str, typer.Option(help="where the model runs: auto (cuda, then mps, then cpu), cpu, cuda or mps")
]
SpecArg = Annotated[Path, typer.Argument(help="model spec, YAML or JSON, in Keras' vocabulary")]
RunArg = Annotated[Path, typer.Argument(help="a run directory written by `capas train`")]


@app.command()
@friendly
def summary(spec: SpecArg) -> None:
    """Print the Keras-style summary of a spec or a run directory: shapes, parameters, trainable, multiply-adds."""
    from capas.spec import load_spec
    from capas.spec.summary import summarize

    written = ""  # a run's summary.txt
    saved = os.path.isdir(spec)  # False for a name too long to be a file's, where Path.is_dir raises
    if saved:
        if (
            spec / "runtime.json"
        ).is_file():  # a quantized ONNX run: its model.json is the float architecture
            console.print(
                f"{spec} runs a quantized ONNX Runtime graph; below is the float architecture "
                "it was quantized from (same layers, shapes and parameter counts)",
                highlight=False,
                markup=False,
            )
        note = spec / "summary.txt"  # what the run wrote above its table; damaged bytes match no table
        written = note.read_text(encoding="utf-8", errors="replace") if note.is_file() else ""
        spec = spec / "model.json"
    table = summarize(load_spec(spec, saved=saved))
    if written.endswith(table.text()) and written != table.text():
        # what the run wrote above its table, e.g. the layers fine-tuning unfroze
        console.print(
            written[: -len(table.text())].rstrip("\n"), highlight=False, markup=False, soft_wrap=True
        )
    table.print(console)


def _setting_help(settings: type[BaseModel], name: str, show_default: bool = True) -> str:
    """An option's help from the settings field it sets: its description and, unless typer shows it
    already, its default; the one definition of both is the field."""
    field = settings.model_fields[name]
    text = field.description or name.replace("_", " ")
    if not show_default or (field.default is None and field.default_factory is None):
        return text
    if field.default_factory is not None:  # its docstring starts with what it computes, e.g. "cores - 1:"
        default = (field.default_factory.__doc__ or "").split(":")[0].strip()
    else:
        default = f"{field.default:g}" if isinstance(field.default, float) else field.default
    return f"{text} (default {default})"


def _section(value: object, where: str, config: Path | None, example: str) -> dict:
    """A section of a --config file as a fresh dict (absent: empty); anything else is the file's error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CapasError(f"{config}: {where} must be a mapping such as {example}, got {value!r}")
    return dict(value)


def _overrides(**values: Any) -> dict:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
@friendly
def train(
    spec: SpecArg,
    data: Annotated[
        str | None, typer.Option(help="fashion-mnist, mnist, cifar10, digits or folder:PATH")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="where to look for dataset files first")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with `train:` and `data:` sections")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<spec name>)")] = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd, adam, adamw, rmsprop or adadelta")] = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    schedule: Annotated[
        str | None,
        typer.Option(help="constant, step, cosine, onecycle, linear or plateau (reduce on plateau)"),
    ] = None,
    label_smoothing: float | None = None,
    patience: Annotated[
        int | None, typer.Option(help="early stopping on val_loss with this patience")
    ] = None,
    seed: int | None = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps")] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="float32, bfloat16 (mixed precision: bfloat16 forward passes), or auto (bfloat16 where "
            "the device computes it natively, else float32)"
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="train on a stratified subset of this many images")
    ] = None,
    test_limit: Annotated[
        int | None, typer.Option(help="test on a stratified subset of this many images (default: all)")
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option(help="budget of seconds in training steps; stops within the epoch")
    ] = None,
    tta: Annotated[
        str | None,
        typer.Option(help="test-time augmentation: none, flip or flip_shift (kept for predict and serve)"),
    ] = None,
    nproc: Annotated[
        int, typer.Option(min=1, help="processes for one data-parallel run (DDP: gloo on CPU, nccl on GPUs)")
    ] = 1,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--nondeterministic",
            help="deterministic algorithms, so reruns match on GPUs too (default: on)",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="PyTorch CPU threads (results depend on it; default: all)")
    ] = None,
    winograd: Annotated[
        bool | None,
        typer.Option(
            "--winograd/--no-winograd", help=_setting_help(TrainConfig, "winograd", show_default=False)
        ),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="discard an unfinished run in --out and start it over")
    ] = False,
) -> None:
    """Train a spec on a dataset and write a run directory; prints test accuracy and the confusion matrix.

    Under torchrun, each process trains its share of every batch and rank 0 writes the run directory.
    """
    from capas.spec import DataConfig, load_document, load_spec
    from capas.spec.io import parse_config
    from capas.train import RichProgress
    from capas.train import train as train_run

    model_spec = load_spec(spec)
    document = load_document(config) if config else {}
    if not isinstance(document, dict):
        raise CapasError(f"{config}: expected a mapping with `train:` and `data:` sections")
    if unknown := sorted(set(map(str, document)) - {"train", "data"}):  # a typo trained on defaults
        raise CapasError(
            f"{config}: unknown section {unknown[0]!r}{closest(unknown[0], ['train', 'data'])}; "
            "allowed: train, data (a model spec is the first argument, not --config)"
        )
    train_raw = _section(document.get("train"), "train", config, example="{epochs: 10}")
    train_raw.update(
        _overrides(
            epochs=epochs,
            batch_size=batch_size,
            label_smoothing=label_smoothing,
            seed=seed,
            device=device,
            precision=precision,
            max_seconds=max_seconds,
            deterministic=deterministic,
            threads=threads,
            tta=tta,
            winograd=winograd,
        )
    )
    opt = _section(train_raw.get("optimizer"), "train.optimizer", config, example="{name: adam}")
    opt.update(_overrides(name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay))
    train_raw["optimizer"] = opt
    if schedule is not None:
        current = _section(train_raw.get("schedule"), "train.schedule", config, example="{name: cosine}")
        train_raw["schedule"] = {**current, "name": schedule}
    if patience is not None:
        current = _section(
            train_raw.get("early_stopping"), "train.early_stopping", config, example="{patience: 3}"
        )
        train_raw["early_stopping"] = {**current, "patience": patience}
    data_raw = _section(document.get("data"), "data", config, example="{name: digits}")
    data_raw.update(_overrides(name=data, data_dir=data_dir, limit=limit, test_limit=test_limit))
    train_cfg = parse_config(TrainConfig, train_raw, "training config")
    data_cfg = parse_config(DataConfig, data_raw, "data config")
    from capas.train import distributed

    out = out or Path("runs") / model_spec.name
    main = distributed.env_rank() == 0  # under torchrun, rank 0 alone prints
    if main:
        console.print(
            f"training [bold]{_shown(model_spec.name)}[/] on {_shown(data_cfg.name)} -> {_shown(str(out))}",
            highlight=False,
        )
        from capas.cpu import bfloat16_warning
        from capas.inference import choose_precision, resolve_device
        from capas.train import winograd

        run_device = resolve_device(train_cfg.device)
        chosen = train_cfg.precision
        if train_cfg.precision == "auto":
            chosen, why = choose_precision("auto", run_device)
            console.print(f"precision auto: {chosen} ({why})", highlight=False)
        if train_cfg.winograd == "auto" and winograd.auto(run_device, chosen, train_cfg.compile):
            console.print(
                "winograd auto: on for the wide 3×3 convolutions where it pays (float32 on a CPU with "
                "AVX2, without AVX-512)",
                highlight=False,
            )
        if train_cfg.winograd is True and (run_device.type != "cpu" or chosen != "float32"):
            errors.print(
                f"[bold yellow]warning:[/] winograd computes float32 training on a CPU; this run trains in "
                f"{chosen} on {run_device.type}, where it changes nothing",
                highlight=False,
            )
        if warning := bfloat16_warning(run_device, train_cfg.precision):
            errors.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    if distributed.launched():
        results = distributed.train_ranked(
            model_spec, data_cfg, train_cfg, out, callbacks=[RichProgress(console)], restart=restart
        )
    elif nproc > 1:
        results = distributed.launch(model_spec, data_cfg, train_cfg, out, nproc, restart=restart)
    else:
        results = train_run(
            model_spec, data_cfg, train_cfg, out, callbacks=[RichProgress(console)], restart=restart
        )
    if main:
        ended = f"best epoch {results['best_epoch']}, {results['stopped']}"
        if train_cfg.early_stopping is None:
            # the run keeps its last epoch's weights, which test.json's best_epoch names; its best epoch
            # is the one of the lowest val_loss, as a study report says
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            lowest = best_epoch(history, "val_loss")
            if lowest != results["best_epoch"]:
                best = f"best epoch {lowest} by val_loss" if lowest else "no finite val_loss"
                ended = (
                    f"{best}, {results['stopped']}: the weights are the last epoch's, {results['best_epoch']}"
                )
        _print_test(results, ended)
        console.print(f"run directory: {out}", highlight=False, markup=False)


@app.command()
@friendly
def info() -> None:
    """Print the machine as capas records it in run directories: versions, cores, CPU fast paths, GPU."""
    from capas.cpu import describe
    from capas.runs import environment

    env = environment()
    for key, value in env.items():
        if key != "cpu_features":
            console.print(f"{key}: {value}", highlight=False)
    console.print(describe(env["cpu_features"]), highlight=False)


def _print_test(results: dict, ended: str) -> None:
    console.print(
        f"test accuracy {results['test_accuracy']:.4f}  test loss {results['test_loss']:.4f}  ({ended})",
        highlight=False,
    )
    _print_confusion(results["classes"], results["confusion_matrix"], " (test.json holds it)")


def _print_confusion(classes: list[str], matrix: list[list[int]], kept: str = "") -> None:
    # each column needs its widest number, 2 spaces of padding and a border; Rich squeezes a table
    # wider than the terminal into a wall of borders (and takes 30 s to draw 1,000 classes' million cells)
    widths = [
        max(len(str(index)), *(len(str(row[index])) for row in matrix)) + 3 for index in range(len(classes))
    ]
    needed = sum(widths) + len(str(len(classes) - 1)) + 4
    if needed > console.width:
        console.print(
            f"confusion matrix of {len(classes):,} classes left out: it needs {needed:,} columns, the terminal "
            f"has {console.width}{kept}",
            highlight=False,
        )
        return
    table = Table(title="confusion matrix (rows: true class, columns: predicted)", title_justify="left")
    table.add_column("")
    for index in range(len(classes)):
        table.add_column(str(index), justify="right")
    for index, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        table.add_row(
            f"{index} {_shown(name)}", *(f"[bold]{v}[/]" if i == index else str(v) for i, v in enumerate(row))
        )
    console.print(table)


@app.command()
@friendly
def evaluate(
    run: RunArg,
    data: Annotated[str | None, typer.Option(help="evaluate on this dataset's test split instead")] = None,
    data_dir: Annotated[str | None, typer.Option(help="where to look for dataset files first")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Evaluate a run directory on the test split of its dataset (or of --data)."""
    from capas.inference import resolve_device
    from capas.predict import evaluate_run
    from capas.runs import load_run
    from capas.spec import DataConfig

    loaded = load_run(run, device=resolve_device(device))
    data_cfg = DataConfig(name=data, data_dir=data_dir) if data is not None else None
    used, result = evaluate_run(loaded, data_cfg, data_dir)
    console.print(
        f"{_shown(used)}: test accuracy {result.accuracy:.4f}  test loss {result.loss:.4f}  ({len(result.labels)} images)",
        highlight=False,
    )
    _print_confusion(list(loaded.classes), result.confusion(len(loaded.classes)).tolist())


@app.command()
@friendly
def predict(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="image files (PNG, JPEG, …)")],
    top_k: Annotated[int, typer.Option(min=1)] = 3,
    device: DeviceOpt = "auto",
) -> None:
    """Classify image files with a run directory's model, preprocessed exactly as in training."""
    from capas.inference import resolve_device
    from capas.predict import predict_files
    from capas.runs import load_run

    loaded = load_run(run, device=resolve_device(device))
    for path, prediction in zip(images, predict_files(loaded, images), strict=True):
        top = ", ".join(f"{label} {p:.3f}" for label, p in prediction.top(loaded.classes, top_k))
        console.print(
            f"{_shown(str(path))}: [bold]{_shown(prediction.label)}[/]  ({_shown(top)})",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@friendly
def study(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="study file (YAML): base, variations, design, seeds")],
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="runs at once (default: one per GPU with CUDA, else cores / train.threads)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="study directory (default studies/<study name>)")] = None,
    data: Annotated[
        str | None, typer.Option(help="dataset instead of the file's: fashion-mnist, cifar10, folder:PATH…")
    ] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="number of seeds instead of the file's")] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="the base spec's input shape instead, e.g. 32,32,3")
    ] = None,
    executor: Annotated[str, typer.Option(help="local (worker processes on this machine) or ray")] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="with --executor ray: join the Ray cluster at HEAD:PORT (default: start a local Ray)"
        ),
    ] = None,
    cpus_per_run: Annotated[float, typer.Option(help="with --executor ray: CPUs each run asks Ray for")] = 1,
    gpus_per_run: Annotated[float, typer.Option(help="with --executor ray: GPUs each run asks Ray for")] = 0,
) -> None:
    """Run every variant × seed of a study (resuming an interrupted one) and write its report."""
    from capas.study.render import print_report
    from capas.study.run import run_study

    make = None
    if executor == "ray":
        from capas.study.executors import ray_executor
        from capas.study.ray_executor import check_options, require_ray

        require_ray()
        check_options(address, cpus_per_run, gpus_per_run)  # before the study's folder is made

        def make(runs: int):
            return ray_executor(
                workers, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run
            )
    elif executor != "local":
        raise CapasError(f"--executor: {executor!r} is not one of local, ray")
    elif given := [  # options the local executor would ignore
        name
        for name in ("address", "cpus_per_run", "gpus_per_run")
        if ctx.get_parameter_source(name).name != "DEFAULT"  # typer's own click: compare by name
    ]:
        raise CapasError(
            f"--{given[0].replace('_', '-')} goes with --executor ray; the local executor takes --workers"
        )

    shape = None
    if input_shape is not None:
        try:
            shape = [int(v) for v in input_shape.split(",")]
        except ValueError:
            shape = []
        if len(shape) != 3 or min(shape) < 1:  # not the study file's input_shape: name the option
            raise CapasError(
                f"--input-shape: expected height,width,channels such as 32,32,3 (three positive whole "
                f"numbers), got {input_shape!r}"
            )
    outcome = run_study(
        file, out=out, workers=workers, data=data, seeds=seeds, input_shape=shape, executor=make
    )
    print_report(outcome.report, console)
    console.print(
        f"report: {outcome.markdown} and {outcome.html} ({outcome.seconds:.0f} s)",
        highlight=False,
        markup=False,
    )
    if outcome.failed:
        raise CapasError(
            f"{len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)}; rerun the same command to retry them"
        )


@app.command()
@friendly
def serve(
    run: RunArg,
    host: Annotated[str | None, typer.Option(help=_setting_help(ServeOptions, "host"))] = None,
    port: Annotated[int | None, typer.Option(help=_setting_help(ServeOptions, "port"))] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="CAPAS_TOKEN", show_envvar=True, help=_setting_help(ServeOptions, "token")),
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help=_setting_help(ServeOptions, "max_batch"))] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help=_setting_help(ServeOptions, "max_wait_ms"))
    ] = None,
    max_body_mb: Annotated[
        float | None, typer.Option(help=_setting_help(ServeOptions, "max_body_mb"))
    ] = None,
    workers_threads: Annotated[int | None, typer.Option(help=_setting_help(ServeOptions, "threads"))] = None,
    device: Annotated[str | None, typer.Option(help=_setting_help(ServeOptions, "device"))] = None,
) -> None:
    """Serve a run directory over HTTP: index page, /predict, /feedback, /monitor, /metrics, /docs."""
    from capas.deploy.serve import make_settings
    from capas.deploy.serve import serve as serve_run

    settings = make_settings(
        flags={
            "host": "--host",
            "port": "--port",
            "token": "--token (CAPAS_TOKEN)",
            "max_batch": "--max-batch",
            "max_wait_ms": "--max-wait-ms",
            "max_body_mb": "--max-body-mb",
            "threads": "--workers-threads",
            "device": "--device",
        },
        run_dir=run,
        **_overrides(
            host=host,
            port=port,
            token=token,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_body_mb=max_body_mb,
            threads=workers_threads,
            device=device,
        ),
    )
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        errors.print(
            f"warning: serving on {settings.host} without a token: anyone who can reach it can use it",
            markup=False,
        )
    serve_run(settings)


@app.command()
@friendly
def export(
    run: RunArg,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="write an ONNX model, checked against PyTorch")
    ] = False,
    keras: Annotated[bool, typer.Option("--keras", help="write a Keras 3 .keras file")] = False,
    out: Annotated[
        Path | None, typer.Option(help="where to write it (default RUN/model.onnx or RUN/model.keras)")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="with --onnx: the dataset whose test images check it (default: the run's)"),
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="where to look for dataset files first")] = None,
) -> None:
    """Export a run's model to ONNX (dynamic batch; outputs logits and embedding; checked against PyTorch)
    or to a Keras 3 .keras file (it takes 0..255 pixels; a first Rescaling scales them as preprocess.json says)."""
    if onnx == keras:
        raise CapasError("choose one format: --onnx or --keras")
    if keras and (data is not None or data_dir is not None):
        raise CapasError("--data and --data-dir go with --onnx (its parity check); --keras uses no dataset")
    if keras:
        from capas.interop.keras import export_keras

        path = export_keras(run, out)
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.3f} MB)", highlight=False, markup=False)
        return
    from capas.deploy.export import export_run
    from capas.spec import DataConfig

    result = export_run(
        run, out, DataConfig(name=data, data_dir=data_dir) if data is not None else None, data_dir
    )
    check = result.parity
    console.print(
        f"wrote {result.path} ({result.bytes / 1e6:.3f} MB); ONNX Runtime vs PyTorch on {check.images} test images: "
        f"max |Δ| logits {check.max_abs_logits:.1e}, embedding {check.max_abs_embedding:.1e} "
        f"(tolerance atol={check.atol}, rtol={check.rtol}), same class for {check.agreement:.1%}",
        highlight=False,
        markup=False,
    )


@app.command("import-keras")
@friendly
def import_keras(
    path: Annotated[Path, typer.Argument(help="a .keras file, a legacy full-model .h5, or a model.json")],
    weights: Annotated[
        Path | None, typer.Option(help="with a model.json: its weights (.weights.h5 or a legacy .h5)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<model name>)")] = None,
    scale: Annotated[
        str | None,
        typer.Option(help="the model's input range for 0..255 pixels: 0..1 (default), 0..255 or -1..1"),
    ] = None,
    classes: Annotated[Path | None, typer.Option(help="class names, one a line")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="the dataset the model is for (class names, evaluate, compress, serve's drift reference)"
        ),
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="where to look for dataset files first")] = None,
) -> None:
    """Import a Keras model (Sequential, or a functional chain) into a run directory: spec, weights, preprocessing."""
    from capas.interop.keras import import_keras as run_import
    from capas.spec.summary import summarize

    written, imported = run_import(
        path, out, weights=weights, scale=scale, classes=classes, data=data, data_dir=data_dir
    )
    for note in imported.notes:
        errors.print(f"[bold yellow]note:[/] {_shown(note)}", highlight=False)
    summary = summarize(imported.spec)
    console.print(
        f"imported {len(imported.spec.layers)} layers, {summary.total:,} parameters -> run directory: {written}",
        highlight=False,
        markup=False,
    )
    if data is None:
        console.print(
            "no --data: evaluate, compress and export --onnx will need --data, and serve runs with drift "
            "monitoring off "
            "(import with --data for a drift reference)",
            highlight=False,
        )


@app.command()
@friendly
def compress(
    run: RunArg,
    quantize: Annotated[str | None, typer.Option(help="int8 (static, calibrated) or dynamic")] = None,
    prune: Annotated[float | None, typer.Option(help="fraction of channels or weights to remove")] = None,
    structured: Annotated[
        bool | None, typer.Option("--structured/--unstructured", help="pruning kind (default: structured)")
    ] = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(help=_setting_help(CompressSettings, "finetune_epochs"))
    ] = None,
    out: Annotated[Path | None, typer.Option(help="new run directory (default: beside RUN)")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="the dataset to calibrate, fine-tune and measure on (default: the run's)"),
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="where to look for dataset files first")] = None,
) -> None:
    """Quantize or prune a run into a new run directory; prints size, latency and accuracy beside the original's."""
    from capas.deploy.compress import compress_run
    from capas.spec import DataConfig

    if quantize and (structured is not None or finetune_epochs is not None):  # they were ignored
        raise CapasError(
            "--structured/--unstructured and --finetune-epochs are --prune's options; --quantize takes neither"
        )
    path, comparison = compress_run(
        run,
        quantize=quantize,
        prune=prune,
        structured=structured is not False,
        finetune_epochs=COMPRESS.finetune_epochs if finetune_epochs is None else finetune_epochs,
        out=out,
        data=DataConfig(name=data, data_dir=data_dir) if data is not None else None,
        data_dir=data_dir,
    )
    table = Table(*comparison.header(), title=f"{comparison.method} (this CPU)", title_justify="left")
    for row in comparison.rows():
        table.add_row(*row)
    console.print(table)
    for note in comparison.notes:
        console.print(note, highlight=False, markup=False)
    for warning in comparison.warnings:
        errors.print(f"[bold yellow]warning:[/] {_shown(warning)}", highlight=False)
    console.print(
        f"run directory: {path} (compress.md, compress.json, lineage.json)", highlight=False, markup=False
    )


def main() -> None:
    """The `capas` command and `python -m capas`. A terminal in a locale that is not UTF-8 (ISO-8859-1)
    cannot show every character capas prints ('×', '−', a class named '日本'): Python's stdout would
    raise UnicodeEncodeError at the first one; it shows '?' instead, as its stderr shows escapes."""
    if isinstance(sys.stdout, io.TextIOWrapper):  # None when the shell closed it (capas … >&-)
        sys.stdout.reconfigure(errors="replace")
    app()
