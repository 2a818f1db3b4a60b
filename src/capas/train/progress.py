"""A live Rich progress bar for `fit`: loss, accuracy and images/s per epoch."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from capas.train.loop import Callback, FitResult

REFRESH = 0.5  # seconds between updates of the running loss and accuracy


class RichProgress(Callback):
    """One bar over all training steps; a line per finished epoch."""

    def __init__(self, console: Console | None = None, description: str = "training"):
        self.console = console or Console(stderr=True, emoji=False)
        self.description = description
        self.progress: Progress | None = None

    def on_fit_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task(
            self.description, total=epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch, rate=""
        )
        self.progress.start()
        self.window_start, self.window_images, self.shown = time.perf_counter(), 0, 0.0
        if start_epoch:
            self.console.print(f"resuming from the checkpoint of epoch {start_epoch}")

    def on_batch_end(self, images: int, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.window_images += images
        now = time.perf_counter()
        if now - self.shown < REFRESH:  # reading the running sums waits for the device
            self.progress.update(self.task, advance=1)
            return
        self.shown = now
        rate = self.window_images / (now - self.window_start)
        seen = self.window_images  # the epoch's images so far: the sums run over the same
        stats = f"loss {loss.item() / seen:.4f}  accuracy {correct.item() / seen:.4f}  {rate:,.0f} img/s"
        self.progress.update(self.task, advance=1, rate=stats)

    def on_epoch_end(self, metrics: dict) -> None:
        self.console.print(
            f"epoch {metrics['epoch']:>3}  loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_accuracy {metrics['val_accuracy']:.4f}  "
            f"{metrics['images_per_s']:,.0f} img/s  {metrics['seconds']:.1f} s",
            highlight=False,
        )
        self.window_start, self.window_images = time.perf_counter(), 0

    def on_fit_end(self, result: FitResult) -> None:
        self.progress.stop()
        if result.stopped != "max epochs":
            self.console.print(f"stopped: {result.stopped}; keeping the weights of epoch {result.best_epoch}")
