"""Run directories: the one place that writes and reads them (weights, ONNX graphs, the drift
reference), so that train, compress, predict, serve and studies agree on what a run holds.

- directory: `write_run`, `load_run`, `Run`, `staging` (write beside, rename when complete),
  `recover` (what a kill left beside a run), `reading` (the run's lock, shared, while a command derives files from it), `environment`, `machine_line`
- runtime: `OnnxModel`, an ONNX Runtime graph behind the interface of a `CapasNet`
- reference: the drift reference (`save_reference`, `load_reference`, `input_statistics`)
"""

from capas.runs.directory import (
    CHECKPOINT,
    RUN_FILES,
    Run,
    architecture_digest,
    check_not_cwd,
    check_not_in_another_run,
    check_not_in_images,
    environment,
    load_run,
    load_weights,
    machine_line,
    not_the_runs,
    reading,
    recover,
    save_weights,
    staging,
    write_run,
)
from capas.runs.reference import (
    INPUT_STATS,
    REFERENCE,
    REFERENCE_SIZE,
    Reference,
    input_statistics,
    load_reference,
    save_reference,
)
from capas.runs.runtime import RUNTIME, OnnxModel, read_runtime

__all__ = [
    "CHECKPOINT",
    "INPUT_STATS",
    "REFERENCE",
    "REFERENCE_SIZE",
    "RUNTIME",
    "RUN_FILES",
    "OnnxModel",
    "Reference",
    "Run",
    "architecture_digest",
    "check_not_cwd",
    "check_not_in_another_run",
    "check_not_in_images",
    "environment",
    "input_statistics",
    "load_reference",
    "load_run",
    "load_weights",
    "machine_line",
    "not_the_runs",
    "read_runtime",
    "reading",
    "recover",
    "save_reference",
    "save_weights",
    "staging",
    "write_run",
]
