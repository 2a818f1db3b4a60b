"""Layer studies: variations of a spec run over several seeds, stored in SQLite, reported with
confidence intervals, plots and architecture diffs."""

from capas.study.spec import KINDS, Study, Variant, kind, load_study

__all__ = ["KINDS", "Study", "Variant", "kind", "load_study"]
