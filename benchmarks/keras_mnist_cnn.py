"""Keras' own mnist_cnn recipe on Fashion-MNIST, timed: the Keras side of benchmarks/fast_recipes.py.

Optional: it needs a Keras backend. The issue's comparison is against Keras on TensorFlow
(`pip install tensorflow-cpu`, then `KERAS_BACKEND=tensorflow`); without TensorFlow it runs Keras 3
on the torch backend, which times Keras' layers over PyTorch instead, and says so. The recipe is
Keras' examples/vision/mnist_convnet.py as the seed article wrote it: Conv2D(32) – Conv2D(64) –
MaxPooling2D – Dropout(0.25) – Flatten – Dense(128) – Dropout(0.5) – Dense(10), Adadelta at 1.0,
batch 128, 12 epochs on the 60,000 training images, accuracy on the 10,000 test images after each
epoch. Prints each epoch's wall time and accuracy, and when the accuracy first reaches 92.5%.

    KERAS_BACKEND=tensorflow python benchmarks/keras_mnist_cnn.py [--epochs 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

if "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = "tensorflow" if importlib.util.find_spec("tensorflow") else "torch"
elif os.environ["KERAS_BACKEND"] == "tensorflow" and importlib.util.find_spec("tensorflow") is None:
    raise SystemExit(
        "KERAS_BACKEND=tensorflow, but tensorflow is not importable in this Python "
        "(pip install tensorflow-cpu, or leave KERAS_BACKEND unset to run Keras on torch)"
    )

import keras
from rich.console import Console
from rich.table import Table

from capas.cpu import cpu_features, describe
from capas.data.idx import load_idx

TARGET = 0.925


class EpochClock(keras.callbacks.Callback):
    """Wall time since training began and test accuracy at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        trained = time.perf_counter() - self.started
        accuracy = float(logs["val_accuracy"])
        self.rows.append((epoch + 1, trained, accuracy))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images (a smoke test)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line (for fast_recipes.py)")
    args = parser.parse_args()
    started = time.perf_counter()
    train, test = load_idx("fashion-mnist")
    x_train = train.images.permute(0, 2, 3, 1).numpy().astype("float32") / 255  # (N, 28, 28, 1)
    x_test = test.images.permute(0, 2, 3, 1).numpy().astype("float32") / 255
    y_train = keras.utils.to_categorical(train.labels.numpy(), 10)
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    y_test = keras.utils.to_categorical(test.labels.numpy(), 10)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Dropout(0.25),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        loss="categorical_crossentropy",
        optimizer=keras.optimizers.Adadelta(learning_rate=1.0),
        metrics=["accuracy"],
    )
    clock = EpochClock()
    model.fit(
        x_train, y_train, batch_size=128, epochs=args.epochs, validation_data=(x_test, y_test), verbose=0,
        callbacks=[clock],
    )  # fmt: skip
    wall = time.perf_counter() - started
    table = Table(
        title=f"Keras {keras.__version__} ({keras.backend.backend()} backend): mnist_cnn on Fashion-MNIST"
    )
    for column in ("epoch", "training s", "test accuracy"):
        table.add_column(column, justify="right")
    for epoch, seconds, accuracy in clock.rows:
        table.add_row(str(epoch), f"{seconds:.1f}", f"{100 * accuracy:.2f}%")
    console = Console()
    console.print(table)
    reached = next((seconds for _, seconds, accuracy in clock.rows if accuracy >= TARGET), None)
    console.print(
        f"wall time {wall:.1f} s (data, model, {args.epochs} epochs with their test passes); "
        + (f"{100 * TARGET:.1f}% first reached after {reached:.1f} s of training" if reached else
           f"{100 * TARGET:.1f}% not reached"),
        highlight=False,
    )  # fmt: skip
    console.print(describe(cpu_features()), highlight=False)
    if args.json:
        result = {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "wall": wall,
            "reached_seconds": reached,
            "epochs": [{"epoch": e, "seconds": s, "accuracy": a} for e, s, a in clock.rows],
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
