"""Specs: Keras-exact parameter counts and shapes for the seed models, and a clear message for every bad spec."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from capas.errors import CapasError
from capas.models import build_model
from capas.spec import ModelSpec, load_spec
from capas.spec.io import MAX_BYTES
from capas.spec.summary import readable_bytes, summarize

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    ("file", "total", "shapes"),
    [
        ("seed000-flatten.yaml", 1_164_042, [(30, 30, 128), (28, 28, 128), (26, 26, 128), (86528,), (10,)]),
        ("seed000-gap.yaml", 300_042, [(30, 30, 128), (28, 28, 128), (26, 26, 128), (128,), (10,)]),
        ("seed000-gmp.yaml", 300_042, [(30, 30, 128), (28, 28, 128), (26, 26, 128), (128,), (10,)]),
        (
            "keras-mnist.yaml",
            1_199_882,
            [(26, 26, 32), (24, 24, 64), (12, 12, 64), (12, 12, 64), (9216,), (128,), (128,), (10,)],
        ),
    ],
)
def test_seed_models_match_keras(file, total, shapes):
    spec = load_spec(EXAMPLES / file)
    summary = summarize(spec)
    assert summary.total == summary.trainable == total
    assert summary.non_trainable == 0
    assert [row.output_shape for row in summary.rows] == shapes
    assert sum(p.numel() for p in build_model(spec).parameters()) == total


def test_keras_layer_names_and_counts_per_layer():
    rows = summarize(load_spec(EXAMPLES / "keras-mnist.yaml")).rows
    assert [r.name for r in rows] == [
        "conv2d",
        "conv2d_1",
        "max_pooling2d",
        "dropout",
        "flatten",
        "dense",
        "dropout_1",
        "dense_1",
    ]
    assert [r.trainable for r in rows] == [320, 18_496, 0, 0, 0, 1_179_776, 0, 1_290]
    assert rows[0].macs == 26 * 26 * 3 * 3 * 1 * 32


def test_a_named_layer_takes_no_number_from_keras_automatic_names():
    """Keras numbers only the layers it names itself: after a Conv2D named 'first', the next Conv2D
    is 'conv2d' in Keras' summary (capas said 'conv2d_1')."""
    spec = _spec(
        {"Conv2D": {"filters": 4, "kernel_size": 3, "name": "first"}},
        {"Conv2D": {"filters": 4, "kernel_size": 3}},
        {"Conv2D": {"filters": 4, "kernel_size": 3}},
        "Flatten",
        {"Dense": {"units": 3, "name": "dense_top"}},
        {"Dense": {"units": 3}},
    )
    assert [r.name for r in summarize(spec).rows] == [
        "first",
        "conv2d",
        "conv2d_1",
        "flatten",
        "dense_top",
        "dense",
    ]


def test_a_name_taken_by_a_keras_automatic_name_is_refused_as_keras_does():
    """Keras refuses Sequential([Dense(name='dense'), Dense()]): the second is named 'dense' too."""
    with pytest.raises(
        CapasError, match=r"the name 'dense' is used twice.*a layer without a name gets Keras'"
    ):
        _spec("Flatten", {"Dense": {"units": 3, "name": "dense"}}, {"Dense": {"units": 2}})


def _spec(*layers, shape=(32, 32, 3)):
    return ModelSpec.from_dict({"name": "t", "input_shape": list(shape), "layers": list(layers)})


def test_normalization_counts_follow_keras():
    summary = summarize(
        _spec(
            {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "strides": 2}},
            "BatchNormalization",
            "LayerNormalization",
            {"GroupNormalization": {"groups": 4}},
            "Flatten",
            {"Dense": {"units": 10}},
            "BatchNormalization",
        )
    )
    conv, bn, ln, gn, flat, _, bn1 = summary.rows
    assert conv.output_shape == (16, 16, 16) and conv.trainable == 3 * 3 * 3 * 16 + 16
    assert (bn.trainable, bn.non_trainable) == (32, 32)  # gamma, beta; moving mean, moving variance
    assert (ln.trainable, gn.trainable) == (32, 32)
    assert flat.output_shape == (16 * 16 * 16,)
    assert (bn1.trainable, bn1.non_trainable) == (20, 20)
    assert summary.non_trainable == 52
    assert summary.total == 448 + 64 + 32 + 32 + (4096 * 10 + 10) + 40


def test_summary_text_has_keras_totals():
    text = summarize(load_spec(EXAMPLES / "seed000-gap.yaml")).text()
    assert "Total params: 300,042 (1.14 MB)" in text
    assert "conv2d_2 (Conv2D)" in text and "(None, 26, 26, 128)" in text


@pytest.mark.parametrize("width", [200, 40], ids=["table", "compact"])
def test_summary_prints_on_a_stream_that_is_not_utf8(width):
    """The library's summarize(spec).print() on a latin-1 stdout (a pipe in an ISO-8859-1 locale)
    raised UnicodeEncodeError at the compact table's rule or at a name it cannot encode; only the
    `capas` command, which reconfigures its own stdout, showed '?'. A library leaves sys.stdout alone."""
    spec = ModelSpec.from_dict(
        {
            "name": "café 日本",
            "input_shape": [8, 8, 1],
            "layers": ["Flatten", {"Dense": {"units": 2, "name": "tête_ψ"}}],
        }
    )
    stream = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")  # strict, as Python's stdout
    summarize(spec).print(Console(file=stream, width=width))
    stream.flush()
    text = stream.buffer.getvalue().decode("latin-1")
    assert 'Model: "café ??"' in text and "tête_?" in text and "Total params: 130" in text
    assert "?" not in text.replace("??", "").replace("_?", "")  # the rules are ASCII, not '?'


def test_final_softmax_is_applied_by_predict_proba_not_forward():
    import torch

    model = build_model(
        _spec("Flatten", {"Dense": {"units": 3, "activation": "softmax"}}, shape=(2, 2, 1))
    ).eval()
    x = torch.randn(4, 1, 2, 2)
    logits = model(x)
    assert not torch.allclose(logits.sum(1), torch.ones(4))
    assert torch.allclose(model.predict_proba(x), torch.softmax(logits, 1))


@pytest.mark.parametrize("dropout", ["Dropout", "SpatialDropout2D"])
def test_a_softmax_followed_only_by_dropout_is_refused(dropout):
    """Its probabilities were taken for logits: predict_proba gave Keras' [0.986 0.006 0.008] as
    [0.571 0.214 0.215], and training took the cross-entropy of a softmax of them."""
    last = {
        "Dropout": ["Flatten", {"Dense": {"units": 3, "activation": "softmax"}}, {"Dropout": {"rate": 0.5}}]
    }
    layers = {
        "Dropout": last["Dropout"],
        "SpatialDropout2D": [
            {"Conv2D": {"filters": 3, "kernel_size": 2}},
            "Softmax",
            {dropout: {"rate": 0.5}},
        ],
    }[dropout]
    with pytest.raises(
        CapasError, match=rf"^layer 1 \(\w+\): applies a softmax and only {dropout} follows it"
    ):
        build_model(_spec(*layers, shape=(2, 2, 1)))
    build_model(
        _spec(*layers[:-1], {"Dense": {"units": 3}} if dropout == "Dropout" else "Flatten", shape=(2, 2, 1))
    )


def test_a_softmax_followed_only_by_a_linear_activation_is_refused():
    """Keras' Dense(3, softmax) then Activation('linear'), imported: predict_proba gave Keras'
    [0.279 0.405 0.316] as [0.315 0.358 0.327] (a softmax of the probabilities)."""
    with pytest.raises(
        CapasError, match=r"^layer 1 \(Dense\): applies a softmax and only Activation follows it"
    ):
        build_model(
            _spec(
                "Flatten",
                {"Dense": {"units": 3, "activation": "softmax"}},
                {"Activation": {"activation": "linear"}},
                shape=(2, 2, 1),
            )
        )


BAD = [
    (
        {"layers": [{"Conv2d": {"filters": 8, "kernel_size": 3}}]},
        ["layer 0", "'Conv2d'", "did you mean 'Conv2D'"],
    ),
    (
        {"layers": [{"Conv2D": {"filter": 8, "kernel_size": 3}}]},
        ["layer 0 (Conv2D)", "'filter'", "did you mean 'filters'"],
    ),
    (
        {"layers": [{"Conv2D": {"filters": "many", "kernel_size": 3}}]},
        ["layer 0 (Conv2D)", "'filters'", "'many'"],
    ),
    (
        {"layers": [{"Conv2D": {"filters": 0, "kernel_size": 3}}]},
        ["layer 0 (Conv2D)", "'filters'", "greater than or equal to 1"],
    ),
    ({"layers": ["Flatten", {"Dropout": {"rate": 1.5}}]}, ["layer 1 (Dropout)", "'rate'", "1.5"]),
    # YAML's yes/on: a BatchNormalization whose statistics never moved (momentum 1.0), rate: no
    (
        {"layers": [{"BatchNormalization": {"momentum": True}}, "Flatten"]},
        ["layer 0 (BatchNormalization)", "'momentum'", "not true or false"],
    ),
    (
        {"layers": [{"Dropout": {"rate": False}}, "Flatten"]},
        ["layer 0 (Dropout)", "'rate'", "not true or false"],
    ),
    (
        {"layers": [{"Rescaling": {"scale": True}}, "Flatten"]},
        ["layer 0 (Rescaling)", "'scale'", "not true or false"],
    ),
    (
        {"layers": [{"Conv2D": {"filters": 8, "kernel_size": 3, "padding": "full"}}]},
        ["layer 0 (Conv2D)", "'padding'", "'valid'", "'same'"],
    ),
    (
        {"layers": [{"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "rellu"}}]},
        ["layer 0 (Conv2D)", "did you mean 'relu'"],
    ),
    (
        {"layers": [{"Conv2D": {"filters": 8, "kernel_size": 3}}] * 3, "input_shape": [5, 5, 1]},
        ["layer 2 (Conv2D)", "below 1×1", "input 1×1"],
    ),
    (
        {"layers": [{"MaxPooling2D": {"pool_size": 8}}], "input_shape": [4, 4, 1]},
        ["layer 0 (MaxPooling2D)", "pool_size"],
    ),
    (
        {"layers": [{"Conv2D": {"filters": 6, "kernel_size": 3}}, {"GroupNormalization": {"groups": 4}}]},
        ["layer 1 (GroupNormalization)", "groups=4", "6 channels"],
    ),
    ({"layers": [{"Dense": {"units": 10}}]}, ["layer 0 (Dense)", "Flatten"]),
    (
        {"layers": ["Flatten", {"Conv2D": {"filters": 2, "kernel_size": 1}}]},
        ["layer 1 (Conv2D)", "feature maps"],
    ),
    ({"input_shape": [28, 28]}, ["input_shape", "[height, width, channels]"]),
    ({"input_shape": None, "drop": "input_shape"}, ["'input_shape' is missing"]),
    ({"layers": []}, ["'layers'", "non-empty"]),
    ({"layers": [{"Conv2D": {"filters": 8}}]}, ["layer 0 (Conv2D)", "'kernel_size' is required"]),
    ({"layers": [{"Dense": {"units": 3}, "Flatten": None}]}, ["layer 0", "one-key mapping"]),
    ({"layer": []}, ["unknown key 'layer'", "did you mean 'layers'"]),
    # "Input should be a valid tuple": an int is what Keras users write
    (
        {"layers": [{"Conv2D": {"filters": 2, "kernel_size": "3"}}]},
        ["layer 0 (Conv2D)", "'kernel_size': Input should be a whole number or [height, width] (given '3')"],
    ),
    (
        {"train": {"epochs": 3}},
        ["unknown key 'train'", "a training config, with train: and data:, goes to --config"],
    ),
    # a '.' was a KeyError from torch when training (module names), a '/' a Keras export Keras refuses
    (
        {"layers": [{"Flatten": {"name": "flat.a"}}, {"Dense": {"units": 10}}]},
        ["layer 0 (Flatten)", "'flat.a'", "may not contain '.' or '/'"],
    ),
    ({"layers": ["Flatten", {"Dense": {"units": 10, "name": "out/1"}}]}, ["layer 1 (Dense)", "'out/1'"]),
]


@pytest.mark.parametrize(("change", "needles"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_specs_name_the_problem(change, needles):
    data = {"name": "bad", "input_shape": [28, 28, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    data.update({k: v for k, v in change.items() if k != "drop"})
    data.pop(change.get("drop"), None)
    with pytest.raises(CapasError) as error:
        ModelSpec.from_dict(data)
    for needle in needles:
        assert needle in str(error.value), str(error.value)


@pytest.mark.parametrize("name", sorted(set(dir(torch.nn.ModuleDict())) | {"_anything"}))
def test_layer_names_that_are_module_attributes_are_refused(name):
    """The built layers are kept in an nn.ModuleDict by name: a name that is one of its attributes
    ('training', 'forward', 'keys', ...) passed the summary, then training stopped on torch's KeyError."""
    with pytest.raises(
        CapasError, match=f"layer 0 \\(Flatten\\): the name {re.escape(repr(name))} is reserved"
    ):
        _spec({"Flatten": {"name": name}}, {"Dense": {"units": 10}})


@pytest.mark.parametrize("name", [".", "..", "/tmp/escaped", "../x", "a/b/c", "a\\b", "nul\x00", "tab\there"])
def test_a_name_that_is_not_one_folder_name_is_refused(name):
    """`name` is the default run folder runs/<name>: '.' wrote a run into runs/ itself, '/abs' and
    '../x' outside it, 'a/b/c' into nested folders."""
    data = {"name": name, "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    with pytest.raises(CapasError, match=r"spec: 'name' is the run folder runs/<name>") as error:
        ModelSpec.from_dict(data)
    assert repr(name) in str(error.value)


def test_a_name_may_hold_spaces_dots_and_unicode():
    data = {
        "name": "wide net v1.2 (β)",
        "input_shape": [8, 8, 1],
        "layers": ["Flatten", {"Dense": {"units": 3}}],
    }
    assert ModelSpec.from_dict(data).name == "wide net v1.2 (β)"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ninput_shape: [28, 28, 1\nlayers:\n  - Flatten\n")
    with pytest.raises(CapasError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_spec(path)


@pytest.mark.parametrize("name", ["model.keras", "spec.yaml"])
def test_a_binary_file_is_not_a_spec(tmp_path, name):
    """A binary file (a Keras model given to `capas summary`) was a UnicodeDecodeError's traceback."""
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04\xff\xfe" + bytes(range(256)))
    with pytest.raises(CapasError, match=f"{name}: not a YAML or JSON document") as error:
        load_spec(path)
    assert ("import-keras" in str(error.value)) == name.endswith(".keras")


def test_spec_round_trips_through_its_dict():
    spec = load_spec(EXAMPLES / "keras-mnist.yaml")
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.to_dict() == spec.to_dict()
    assert summarize(again).total == 1_199_882


def test_spec_summary_and_cli_do_not_import_torch_or_extras_nor_models_dynamo():
    # a fresh interpreter: this test process has torch loaded already
    code = (
        "import sys\n"
        "from capas.spec import load_spec\n"
        "from capas.spec.summary import summarize\n"
        f"summarize(load_spec({str(EXAMPLES / 'seed000-gap.yaml')!r})).text()\n"
        "import capas.cli\n"  # the command, too: `capas summary` needs none of the extras
        "heavy = ('torch', 'torchvision', 'numpy', 'pydantic_settings', 'fastapi', 'scipy', 'matplotlib')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        # with torch: a model that is not compiled needs no Dynamo, which a decorator in capas.models
        # imported at every command's start (with sympy: 170 MB, 1 to 8 s here)
        "import capas.predict, capas.deploy.serve\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_key_repeated_in_yaml_is_named_with_its_line(tmp_path):
    """The second input_shape silently replaced the first."""
    path = tmp_path / "twice.yaml"
    path.write_text(
        "name: x\ninput_shape: [8, 8, 1]\nlayers: [Flatten, {Dense: {units: 10}}]\ninput_shape: [32, 32, 3]\n"
    )
    with pytest.raises(CapasError, match=r"twice.yaml: invalid YAML at line 4.*'input_shape' appears twice"):
        load_spec(path)


def test_a_rule_across_keywords_is_reported_without_a_made_up_keyword():
    from capas.spec import TrainConfig
    from capas.spec.io import parse_config

    with pytest.raises(CapasError) as error:
        parse_config(TrainConfig, {"winograd": True, "compile": True}, "training config")
    message = str(error.value)
    assert message.startswith("training config: winograd: true and compile: true cannot be combined"), message
    assert "'keywords'" not in message and "given" not in message


def test_a_key_repeated_in_json_is_refused(tmp_path):
    """In a JSON spec the second `layers` silently replaced the first (YAML's repeat was refused)."""
    path = tmp_path / "twice.json"
    path.write_text(
        '{"name": "x", "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}],'
        ' "layers": [{"Dense": {"units": 3}}]}'
    )
    with pytest.raises(
        CapasError, match=r"twice.json: invalid JSON: key 'layers' appears twice in one object"
    ):
        load_spec(path)


def test_yaml_merge_keys_load_and_may_be_overridden(tmp_path):
    """`<<: *anchor` (YAML's merge key) was refused as invalid YAML ("could not determine a
    constructor"); a key beside the merge overrides the merged one, and is no repeat."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "name: x\ninput_shape: [8, 8, 1]\nlayers:\n"
        "  - Conv2D: &conv {filters: 2, kernel_size: 3, activation: relu}\n"
        "  - Conv2D: {<<: *conv, filters: 4}\n"
        "  - Flatten\n"
    )
    spec = load_spec(path)
    assert [(layer.filters, layer.activation) for layer in spec.layers[:2]] == [(2, "relu"), (4, "relu")]
    path.write_text(
        "name: x\ninput_shape: [8, 8, 1]\nlayers: [{Flatten: {<<: {name: a}, name: b, name: c}}]\n"
    )
    with pytest.raises(CapasError, match=r"merge.yaml: invalid YAML at line 3.*'name' appears twice"):
        load_spec(path)


def test_a_list_as_a_yaml_key_is_one_message(tmp_path):
    """`? [1, 2]` as a key was a TypeError's traceback (unhashable type)."""
    path = tmp_path / "odd.yaml"
    path.write_text("input_shape: [8, 8, 1]\n? [1, 2]\n: x\nlayers: [Flatten]\n")
    with pytest.raises(CapasError, match=r"odd.yaml: invalid YAML at line 2.*unhashable key"):
        load_spec(path)


def test_a_json_spec_with_a_byte_order_mark_loads(tmp_path):
    """A JSON spec saved by a Windows editor (UTF-8 with a BOM) was "invalid JSON ... Unexpected UTF-8
    BOM"; the same YAML loaded."""
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf{"name": "b", "input_shape": [8, 8, 1], "layers": ["Flatten"]}')
    assert load_spec(path).name == "b"


@pytest.mark.parametrize(
    "name, text",
    [("deep.yaml", "name:\n" + "- " * 1100 + "x\n"), ("deep.json", "[" * 100_000 + "]" * 100_000)],
)
def test_a_document_nested_too_deeply_is_one_message(tmp_path, name, text):
    """Lists nested deeper than the parser can follow were a RecursionError's traceback. PyYAML recurses
    in Python (sys.getrecursionlimit(), 1,000); json's C scanner, from Python 3.12, counts against the
    interpreter's C recursion limit instead: 1,100 levels parse on 3.12.1 and 5,000 on 3.13.0."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CapasError, match=rf"{name}: nested too deeply"):
        load_spec(path)


@pytest.mark.parametrize(
    "shape, layer, message",
    [
        ([8, 8, 1], {"Dense": {"units": 10**30}}, r"layer 1 \(Dense\): .*2\*\*40"),
        ([8, 8, 1], {"Dense": {"units": 2**34}}, r"layer 1 \(Dense\): 1,116,691,496,960 parameters"),
        ([10**30, 8, 1], {"Dense": {"units": 10}}, r"'input_shape'.*2\*\*40"),
    ],
)
def test_a_size_no_tensor_holds_is_refused(shape, layer, message):
    """`units: 1e30` (or filters, or an input side) passed: the summary printed 10^23 GB and
    `capas train` was PyTorch's traceback ("Overflow when unpacking long long")."""
    with pytest.raises(CapasError, match=message):
        ModelSpec.from_dict({"name": "x", "input_shape": shape, "layers": ["Flatten", layer]})


def test_aliases_that_expand_to_millions_of_values_are_refused(tmp_path):
    """A 300-byte YAML "billion laughs" (anchors of nine aliases of the one before) took seconds to
    minutes and megabytes of error message per level, as the message repeats the value it names."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    path = tmp_path / "laughs.yaml"
    path.write_text("name: {" + ", ".join(levels) + "}\ninput_shape: [8, 8, 1]\nlayers: [Flatten]\n")
    with pytest.raises(
        CapasError, match=r"laughs.yaml: its aliases \(\*name\) expand to more than 1,000,000"
    ):
        load_spec(path)


def test_a_document_larger_than_any_spec_is_refused_without_reading_it_all(tmp_path):
    """`capas summary /dev/zero` read forever (and a huge file into memory at once)."""
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:
        file.truncate(MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CapasError, match=r"huge.yaml: larger than 64 MiB; capas reads YAML or JSON"):
        load_spec(path)
    with pytest.raises(CapasError, match=r"/dev/zero: larger than 64 MiB"):
        load_spec("/dev/zero")


def test_a_control_character_in_yaml_is_one_line_naming_its_line(tmp_path):
    """A NUL or other control character was a two-line message with a character offset."""
    path = tmp_path / "ctrl.yaml"
    path.write_text("name: x\ninput_shape: [8, 8, 1]\nlayers: [Flatten]  # \x00\n")
    with pytest.raises(CapasError) as error:
        load_spec(path)
    assert str(error.value) == (
        f"{path}: invalid YAML at line 3: character #x0000 is not allowed (a control character)"
    )


@pytest.mark.parametrize(
    "count, text",
    [
        (1023, "1023.00 B"),
        (4 * 2**20, "4.00 MB"),
        (2**38, "256.00 GB"),
        (2**40, "1.00 TB"),
        (3 * 2**50, "3.00 PB"),
    ],
)
def test_byte_figures_are_keras_units(count, text):
    """Keras' readable_memory_size goes on to TB and PB; capas stopped at GB (a 1 TiB model: 1024.00 GB)."""
    assert readable_bytes(count) == text


def test_a_long_model_name_stays_on_one_line_and_wide_characters_keep_the_columns():
    """The name was the table's title, which Rich wrapped at the table's width (summary.txt folded a long
    name at about 77 columns of 120); the narrow table padded by characters, so a CJK name (two cells a
    character) pushed its row's columns right."""
    from rich.cells import cell_len

    name = "a-very-long-model-name-" * 4
    layers = [
        {"Conv2D": {"filters": 2, "kernel_size": 3, "name": "第一个卷积层"}},
        "Flatten",
        {"Dense": {"units": 3}},
    ]
    summary = summarize(ModelSpec.from_dict({"name": name, "input_shape": [8, 8, 1], "layers": layers}))
    assert summary.text().splitlines()[0] == f'Model: "{name}"'
    rows = [line for line in summary.compact(60).splitlines() if "(None," in line]
    assert len(rows) == 3
    assert len({cell_len(row[: row.index("(None,")]) for row in rows}) == 1, rows
