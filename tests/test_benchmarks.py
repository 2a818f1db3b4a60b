"""The arithmetic and verdicts of the benchmark scripts whose figures the README publishes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from capas.spec import TrainConfig
from capas.train import depthwise

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str):
    """A benchmark script imported as a module (its folder on sys.path, as when it runs)."""
    if (module := sys.modules.get(f"benchmark_{name}")) is not None:
        return module
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def summary(budget: float | None, accuracies: list[float], walls: list[float]) -> str:
    fast_recipes = script("fast_recipes")
    runs = [
        {"epochs_run": 5, "test_accuracy": a, "wall": w, "train_seconds": w - 5, "images_per_s": 6000.0}
        for a, w in zip(accuracies, walls, strict=True)
    ]
    console = Console(record=True, width=400)
    fast_recipes.report(console, "fashion-mnist", fast_recipes.RECIPES["fashion-mnist"], runs, 0, budget)
    return console.export_text().splitlines()[-1]


def test_fast_recipes_counts_a_seed_as_met_only_within_the_budget_and_above_the_target():
    line = summary(60.0, [0.93, 0.93, 0.924], [59.0, 61.0, 50.0])
    assert line.endswith("met by 1 of 3 seeds")


def test_fast_recipes_gives_one_seed_no_spread():
    """One seed's summary said '72.35 ± nan%'."""
    line = summary(60.0, [0.7235], [59.0])
    assert "test accuracy 72.35% (min–max 72.35–72.35)" in line and "nan" not in line


@pytest.mark.parametrize("accuracies", [[0.93, 0.93, 0.93], [0.92, 0.93, 0.93]])
def test_fast_recipes_without_a_reference_does_not_call_the_target_met(accuracies):
    """Fashion-MNIST's budget is a fifth of Keras' time: without the reference run (--no-reference)
    no seed's time can be judged, so none may be counted as meeting the target."""
    line = summary(None, accuracies, [50.0, 51.0, 52.0])
    assert "met by" not in line
    reached = sum(a >= 0.925 for a in accuracies)
    assert f"92.5% reached by {reached} of 3 seeds; the time not judged (no reference run)" in line


def keras_reference(tmp_path: Path, reached: float | None) -> tuple[str, float, list[float]]:
    """fast_recipes' reading of keras_mnist_cnn.py's JSON line, from an interpreter that prints one:
    Keras' 3 epochs ended 20, 41 and 60 s into training, 63 s after the script began."""
    line = {
        "keras": "3.15.1", "backend": "tensorflow", "wall": 63.0, "reached_seconds": reached,
        "epochs": [{"epoch": e, "seconds": s, "accuracy": 0.9} for e, s in ((1, 20.0), (2, 41.0), (3, 60.0))],
    }  # fmt: skip
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho '{json.dumps(line)}'\n")
    python.chmod(0o755)
    return script("fast_recipes").keras_reference(str(python), 3)


def test_fast_recipes_budget_is_a_fifth_of_keras_training_time(tmp_path):
    """Keras' time to 92.5% counts from the start of training; when it never gets there, the reference
    is its training time too (all its epochs), not the script's wall time with the data's loading."""
    label, seconds, epochs = keras_reference(tmp_path, 41.0)
    assert (label, seconds, epochs) == ("Keras 3.15.1 (tensorflow), time to 92.5%", 41.0, [20.0, 21.0, 19.0])
    label, seconds, _ = keras_reference(tmp_path, None)
    assert (label, seconds) == ("Keras 3.15.1 (tensorflow), 92.5% not reached: all 3 epochs", 60.0)


def test_summary_time_names_the_processor_it_timed_on():
    """platform.processor() is empty on Linux: the line said 'x86_64, 2 cores, -'."""
    from capas.cpu import cpu_features, cpu_model, describe

    line = script("summary_time").machine()
    assert cpu_model() in line and describe(cpu_features()) in line


def test_train_throughput_tables_bfloat16_alone(monkeypatch, capsys):
    """`--precisions bfloat16` still has the plain loops' float32 rows: their share of the float32
    matmul figure needs that figure (the table raised KeyError: 'float32' after every measurement).
    The trainings are replaced by fixed rates: what is checked is the table made from them."""
    throughput = script("train_throughput")
    monkeypatch.setattr(throughput, "capas_fit", lambda *args, **kwargs: (100.0, 1.0))
    monkeypatch.setattr(throughput, "plain_loop", lambda *args: 50.0)
    monkeypatch.setattr(
        throughput, "matmul_peak", lambda precision: {"float32": 1e11, "bfloat16": 4e11}[precision]
    )
    argv = "train_throughput.py --batches 1 --repeats 1 --precisions bfloat16 --no-keras --data digits"
    monkeypatch.setattr(sys, "argv", argv.split())
    throughput.main()
    out = capsys.readouterr().out
    macs = 3 * 2 * throughput.summarize(throughput.load_spec(throughput.SPEC)).macs
    assert f"{50.0 * macs / 1e11:.0%}" in out  # plain PyTorch, float32
    assert f"{100.0 * macs / 4e11:.0%}" in out  # capas fit, bfloat16
    assert "matmul peak float32 100 GFLOP/s, bfloat16 400 GFLOP/s" in out


def test_fast_recipes_refuses_a_missing_keras_interpreter_before_training(monkeypatch, capsys, tmp_path):
    """A mistyped --keras-python was a FileNotFoundError traceback after every recipe had trained."""
    fast_recipes = script("fast_recipes")

    def train_first(*args):
        raise AssertionError("trained before checking --keras-python")

    monkeypatch.setattr(fast_recipes, "run_seeds", train_first)
    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setattr(sys, "argv", ["fast_recipes.py", "fashion-mnist", "--keras-python", str(missing)])
    with pytest.raises(SystemExit) as stopped:
        fast_recipes.main()
    assert stopped.value.code == 2
    assert f"--keras-python: {missing} is not an executable" in capsys.readouterr().err


def test_fast_recipes_reports_the_recipes_when_keras_fails(monkeypatch, capsys, tmp_path):
    """The recipes train first so that their figures come out even if Keras' run does not: a Keras
    script that fails (no TensorFlow, a crash) leaves them reported, their time not judged."""
    fast_recipes = script("fast_recipes")
    runs = [
        {"epochs_run": 5, "test_accuracy": 0.93, "wall": 50.0, "train_seconds": 45.0, "images_per_s": 6e3}
    ]
    data = fast_recipes.DataConfig(name="fashion-mnist", val_fraction=0.04)
    monkeypatch.setattr(fast_recipes, "run_seeds", lambda *args: (data, runs))
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named keras' >&2\nexit 1\n")
    python.chmod(0o755)
    monkeypatch.setattr(
        sys, "argv", ["fast_recipes.py", "fashion-mnist", "--seeds", "1", "--keras-python", str(python)]
    )
    fast_recipes.main()
    out, err = capsys.readouterr()
    assert "Keras' recipe failed (exit status 1):\nModuleNotFoundError: No module named keras" in err
    assert "92.5% reached by 1 of 1 seeds; the time not judged (no reference run)" in " ".join(out.split())


def test_transfer_titles_the_threads_it_ran_with(monkeypatch, capsys, tmp_path):
    """The backbone's throughput table said '2 threads' whatever torch used. The measurements are
    replaced by fixed figures (and the feature cache it empties by a temporary folder)."""
    import torch

    transfer = script("transfer")
    result = {"test_accuracy": 0.5, "confusion_matrix": [[1, 1], [1, 1]]}
    monkeypatch.setattr(transfer, "throughput", lambda sizes, repeats: [])
    monkeypatch.setattr(transfer, "make_splits", lambda *args, **kwargs: None)
    monkeypatch.setattr(transfer, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(transfer, "timed", lambda *args: (10.0, result))
    monkeypatch.setattr(sys, "argv", ["transfer.py", "--quick"])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    transfer.main()
    assert "EfficientNet-Lite0 forward pass, eval mode, 3 threads" in " ".join(
        capsys.readouterr().out.split()
    )


def test_serve_load_counts_failed_requests_as_errors_not_as_requests_served():
    """serve.py's clients added a latency for every request, a 500 included: a server shedding load
    was credited with its failures as throughput."""
    import http.server
    import queue
    import threading
    import time

    class Failing(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        results, now = queue.Queue(), time.time()
        script("serve")._client_process(server.server_port, b"x", 1, now, now, now + 0.3, results)
        latencies, errors = results.get(timeout=5)
    finally:
        server.shutdown()
    assert latencies == [] and errors > 0


def test_adaptive_seeds_bend_the_interval_a_fixed_count_keeps():
    """The simulation runs capas' own rule and comparison: with a fixed seed count the interval covers
    the true difference in ~95% of studies; stopping on a narrow interval, in fewer."""
    from capas.study.spec import Replication

    adaptive_seeds = script("adaptive_seeds")
    fixed = adaptive_seeds.simulate(Replication(3, 3, 0.0), 1.0, 0.5, 1000)
    adaptive = adaptive_seeds.simulate(Replication(2, 5, 1.0), 1.0, 0.5, 1000)
    assert 0.93 < fixed["coverage"] < 0.97 and fixed["seeds"] == {3: 1.0}
    assert adaptive["coverage"] < 0.91 and adaptive["seeds"][5] < 0.9  # some studies stopped early


@pytest.mark.parametrize("way", script("transfer_step").WAYS)
@pytest.mark.parametrize("unfreeze", [None, 6])
def test_transfer_step_configures_every_way(way, unfreeze):
    """Each way is a training TrainConfig accepts (a cached top phase's fine-tuning switch once made
    the script fail at its first run), and its second epoch, the one timed, is of the phase named."""
    transfer_step = script("transfer_step")
    cfg = transfer_step.config(way, unfreeze)
    assert cfg.epochs >= 2 and (cfg.finetune is None or cfg.finetune.after_epochs >= 2)
    assert cfg.cache_frozen is way.startswith(transfer_step.CACHED)


def test_depthwise_benchmark_finds_the_transfer_presets_wide_kernels():
    """The convolutions the kernel table times, as the preset's step calls them: TensorFlow's padding
    made explicit before block6a's stride-2 convolution, and the last stage's 5×5 maps."""
    calls = {name: call for name, *call in script("depthwise").transfer_calls()}
    shape, w_shape, stride, padding = calls["backbone.block6a.conv_dw"]
    assert tuple(shape[-2:]) == (13, 13) and stride == [2, 2] and padding == [0, 0]
    shape, w_shape, stride, padding = calls["backbone.block6d.conv_dw"]
    assert tuple(shape[-2:]) == (5, 5) and tuple(w_shape[-2:]) == (5, 5) and padding == [2, 2]
    avx512 = frozenset({"avx2", "avx512f"})
    assert depthwise.shift_pays(shape, w_shape, stride, padding, [1, 1], avx512)


@pytest.mark.parametrize("name", ["cpu_memory", "global_max_pooling"])
def test_side_by_side_rows_train_in_the_precision_they_are_labelled(name):
    """The recipes say `precision: auto` (float32 on a CPU without native bfloat16): a row labelled
    bfloat16 that took the recipe's setting trained in float32 there under that label."""
    for label, (_, train, _) in script(name).NETWORKS.items():
        assert train.get("precision", "float32") == ("bfloat16" if "bfloat16" in label else "float32"), label


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed")
def test_keras_mnist_cnn_on_tensorflow_without_it_says_so(tmp_path):
    """`KERAS_BACKEND=tensorflow python benchmarks/keras_mnist_cnn.py` (the README's command) was a
    ModuleNotFoundError traceback from inside Keras where TensorFlow is not installed."""
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "keras_mnist_cnn.py"), "--epochs", "1"],
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "KERAS_BACKEND=tensorflow, but tensorflow is not importable" in done.stderr


def test_conv_in_step_times_every_trained_convolution_in_bfloat16(monkeypatch, capsys):
    """The per-convolution table the README quotes for the airbench preset's bfloat16 step, on the
    small Fashion-MNIST recipe: every Conv2D has a row, the frozen whitening without a backward."""
    conv_in_step = script("conv_in_step")
    argv = "conv_in_step.py --batch 8 --steps 1 --precision bfloat16"
    monkeypatch.setattr(sys, "argv", argv.split())
    conv_in_step.main()
    out = capsys.readouterr().out
    assert "convolutions in a bfloat16 training step, batch 8" in out
    assert "frozen" in out and "input and weights" in out


def test_fast_recipes_names_each_seed_after_its_recipe(tmp_path, capsys, tiny_spec, tiny_data):
    """Two recipes share one spec (cifar10, cifar10-muon): each seed's line names the recipe, not the spec."""
    fast_recipes = script("fast_recipes")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps(tiny_spec.to_dict()))
    cfg = TrainConfig(epochs=1, batch_size=64, seed=2)
    result = fast_recipes.timed_run("cifar10-muon", spec, tiny_data, cfg, tmp_path / "run")
    assert capsys.readouterr().out.startswith(
        f"cifar10-muon seed 2: test accuracy {100 * result['test_accuracy']:.2f}%"
    )
