"""Prediction and evaluation from a run directory alone."""

from __future__ import annotations

import itertools
import reprlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from capas.data import Splits, read_image, splits_for
from capas.data.images import naming_warnings
from capas.errors import CapasError
from capas.inference import Evaluation, autocast, eval_batch_size, evaluate, model_device, tta_logits
from capas.runs import Run
from capas.spec import DataConfig
from capas.spec.io import parse_config


@dataclass
class Prediction:
    label: str
    index: int
    probabilities: list[float]

    def top(self, classes: tuple[str, ...], k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(classes)), key=lambda i: -self.probabilities[i])[:k]
        return [(classes[i], self.probabilities[i]) for i in order]


@torch.no_grad()
def predict(run: Run, images: Iterable[torch.Tensor]) -> list[Prediction]:
    """Class probabilities for decoded uint8 (C, H, W) images of any size, preprocessed as in training
    and with the run's test-time augmentation, in evaluation's batches (`eval_batch_size`: thousands
    of files in one batch ran out of memory). Images are drawn and preprocessed a batch at a time, so
    that one batch of inputs of the model's size is kept, however many and large the images
    (`predict_files` decodes one at a time)."""
    device = model_device(run.model)
    size = eval_batch_size(run.preprocess, device)
    images = iter(images)
    predictions = []
    while inputs := [run.preprocess(image.unsqueeze(0)) for image in itertools.islice(images, size)]:
        batch = torch.cat(inputs).to(device)  # (B, C, H, W)
        with autocast(device, run.precision):
            probabilities = torch.softmax(tta_logits(run.model, batch, run.tta), dim=1).cpu()
        predictions += [
            Prediction(run.classes[int(p.argmax())], int(p.argmax()), p.tolist()) for p in probabilities
        ]
    return predictions


def predict_files(run: Run, paths: Iterable[str | Path]) -> list[Prediction]:
    """`predict` on image files, each decoded whole as training decodes a folder's images: a file
    shrunk while it decodes (as `capas serve` does above a million pixels, to bound a request's
    memory) has other pixels."""
    if isinstance(paths, str | Path):  # iterated, a path is its characters: files '/', 't', …
        raise CapasError(f"paths: a list of image files, got one path {str(paths)!r}; pass [{str(paths)!r}]")
    warned: set[str] = set()

    def decoded(path: str | Path) -> torch.Tensor:
        with naming_warnings(str(path), warned):
            return read_image(Path(path))

    return predict(run, map(decoded, paths))


def run_data(run: Run, data: DataConfig | None = None, data_dir: str | None = None) -> DataConfig:
    """The run's own data config (from config.json), its files looked for in `data_dir` if given (a run
    moved to another machine); or `data` with the run's recorded split_seed and test_fraction: they
    choose the images a held-out test split holds, and the default ones would test on images the
    model trained on — also under another name for the same images (a folder's relative path from
    another directory, or a copy), which is not recognisable as the run's own. Naming the run's own
    dataset, `data` takes its recorded name, which run_splits' test digest check compares."""
    recorded = run.read_json("config.json")
    recorded_data = (recorded or {}).get("data")
    if data is not None:
        if isinstance(recorded_data, dict):
            own = parse_config(DataConfig, recorded_data, f"{run.path / 'config.json'}: data")
            update = {"split_seed": own.split_seed, "test_fraction": own.test_fraction}
            if _same_dataset(own.name, data.name):
                update["name"] = own.name
            data = data.model_copy(update=update)
        return data
    if recorded is None:
        raise CapasError(
            f"{run.path}: config.json is missing, so no dataset is recorded; name one with --data"
        )
    if "data" not in recorded:
        raise CapasError(f"{run.path}: config.json records no dataset; name one with --data")
    data = parse_config(DataConfig, recorded_data, f"{run.path / 'config.json'}: data")
    return data if data_dir is None else data.model_copy(update={"data_dir": data_dir})


def run_splits(run: Run, data: DataConfig | None = None, data_dir: str | None = None) -> Splits:
    """The splits of `run_data(run, data, data_dir)`, checked against the run's classes.

    A run whose classes are the placeholders 0, 1, …, K−1 (a Keras import without --data or --classes)
    takes any dataset of K classes, its outputs in the dataset's class order; a trained run's classes
    0, 1, …, 9 are its dataset's names (digits), and take only datasets of those classes.

    The same dataset split the same way must give the test images the run was tested on (config.json
    records their digest): if its files changed since (added, removed, edited, or another copy of the
    folder), the new test split may hold images the model trained on, and is refused.
    """
    recorded = run.read_json("config.json")
    data = run_data(run, data, data_dir)
    splits = splits_for(data)
    tested = (recorded or {}).get("splits") or {}
    if not isinstance(tested, dict) or any(
        not isinstance(tested.get(key, {}), dict) or (key in tested and "test" not in tested[key])
        for key in ("sizes", "sha256")
    ):
        raise CapasError(
            f"{run.path / 'config.json'}: splits: damaged, expected a mapping whose sizes and sha256 map "
            f"each split (train, val, test) to its figure, got {reprlib.repr(tested)}"
        )
    if _recipe(tested) == _recipe(splits.info) and any(
        key in tested and tested[key]["test"] != splits.info[key]["test"] for key in ("sizes", "sha256")
    ):  # runs made before the digests were recorded are checked by their test split's size
        raise CapasError(
            f"{data.name}: its test split is no longer the one {run.path} was tested on (the dataset's "
            "files changed since training: added, removed or edited images, or another copy); it may "
            "now hold images the model trained on. Restore the files, or put new images in a folder "
            "of their own: --data folder:NEW scores its held-out test part, capas predict each image"
        )
    if data.name.startswith("folder:") and "sha256" not in tested and _recipe(tested) == _recipe(splits.info):
        warnings.warn(  # a built-in dataset's files are checksummed; a folder's may have changed
            f"{run.path / 'config.json'} records no digest of its test split (an older capas): that "
            f"{data.name} still holds the test images of {run.path} is checked by their number only",
            stacklevel=2,
        )
    placeholders = tuple(str(i) for i in range(len(splits.test.classes)))
    # a trained run (it records its splits) has its dataset's class names, which are 0..9 for MNIST's digits
    unnamed = run.classes == placeholders and "splits" not in (recorded or {})
    if splits.test.classes != run.classes and not unnamed:
        raise CapasError(
            f"{data.name} has classes {list(splits.test.classes)} but the run was trained on {list(run.classes)}"
        )
    return splits


def _same_dataset(recorded: object, name: str) -> bool:
    """Whether dataset `name` is the `recorded` one: a folder by the path it leads to, however it is
    spelt (folder:data/, folder:./data and its absolute path for folder:data)."""
    if not isinstance(recorded, str) or not recorded.startswith("folder:") or not name.startswith("folder:"):
        return recorded == name
    paths = [n.removeprefix("folder:") for n in (recorded, name)]
    return all(p.strip() for p in paths) and len({Path(p).expanduser().resolve() for p in paths}) == 1


def _recipe(info: dict) -> dict:
    """What chose a test split's images: the dataset, seed and test_fraction (a held-out test split
    is drawn first, so val_fraction and limit don't change it); a test_limit subset is drawn after
    the validation split, so with one val_fraction counts too (limit does not: splits.make_splits)."""
    if info.get("test_limit") is None:
        return {key: info.get(key) for key in ("dataset", "seed", "test_fraction", "test_source")}
    return {key: value for key, value in info.items() if key not in ("sizes", "sha256", "limit")}


def evaluate_run(
    run: Run, data: DataConfig | None = None, data_dir: str | None = None
) -> tuple[str, Evaluation]:
    """Test loss and accuracy of a run on the test split of its own data config (its files looked for
    in `data_dir` if given), or of `data`; returns the dataset's name with the evaluation."""
    splits = run_splits(run, data, data_dir)
    device = model_device(run.model)
    return splits.info["dataset"], evaluate(
        run.model, splits.test, run.preprocess, device, run.channels_last, run.precision, run.tta
    )
