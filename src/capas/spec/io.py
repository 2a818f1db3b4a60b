"""Reading YAML/JSON documents with messages that point at the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from capas.errors import CapasError, closest, first_of

T = TypeVar("T", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (the last would silently win).

    Checked as each mapping is read, before merge keys (`<<: *defaults`) copy keys into it: a key
    written beside a merge overrides the merged one, as YAML says."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # a list or mapping as a key: the constructor refuses it with its line
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return node


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict:
    """A JSON object, refusing a key repeated in it (the last would silently win, as in YAML)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise CapasError(f"{path}: invalid JSON: key {key!r} appears twice in one object")
        out[key] = value
    return out


MAX_BYTES = 64 * 2**20
"""The largest document read: a thousand times the largest spec or study capas has met."""

MAX_EXPANDED = 1_000_000
"""The most values a YAML document may hold once its aliases are written out: thousands of times
the largest study, far below what "billion laughs" (anchors of aliases of anchors) reach."""


def _expanded(data: Any, seen: dict[int, int]) -> int:
    """How many values `data` holds with every alias written out (an alias shares its anchor's object)."""
    if not isinstance(data, dict | list):
        return 1
    if id(data) not in seen:
        seen[id(data)] = 1  # an alias inside its own anchor counts once
        items = data.values() if isinstance(data, dict) else data
        seen[id(data)] = 1 + sum(_expanded(item, seen) for item in items)
    return seen[id(data)]


def load_document(path: str | Path) -> Any:
    """A YAML or JSON file as plain Python data; a missing file or a syntax error is a CapasError."""
    path = Path(path)
    # os.path's, not Path's: they answer False for a name longer than a file name may be (`capas summary
    # "$(cat spec.yaml)"`), where Path's raise; a pipe is read: a shell's <(…) gives one
    if os.path.isdir(path) or not os.path.exists(path):
        raise CapasError(f"{path}: {'a directory, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        with open(path, "rb") as file:  # at most one byte past the limit: /dev/zero or a pipe never ends
            data = file.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise CapasError(
                f"{path}: larger than {MAX_BYTES // 2**20} MiB; capas reads YAML or JSON specs and configs"
            )
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is no content
    except UnicodeDecodeError:
        hint = (
            "; a Keras model is imported with capas import-keras" if path.suffix in (".keras", ".h5") else ""
        )
        raise CapasError(f"{path}: not a YAML or JSON document (not UTF-8 text){hint}") from None
    except OSError as error:
        raise CapasError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
        if _expanded(document, {}) > MAX_EXPANDED:  # every message that shows a value would write them out
            raise CapasError(f"{path}: its aliases (*name) expand to more than {MAX_EXPANDED:,} values")
        return document
    except json.JSONDecodeError as error:
        raise CapasError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except RecursionError:  # both parsers recurse once per level of brackets or indentation
        raise CapasError(
            f"{path}: nested too deeply to read (hundreds of levels of lists or mappings)"
        ) from None
    except yaml.reader.ReaderError as error:  # it has a character offset, not a line
        line = text.count("\n", 0, error.position) + 1
        raise CapasError(
            f"{path}: invalid YAML at line {line}: character #x{error.character:04x} is not allowed "
            "(a control character)"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise CapasError(f"{path}: invalid YAML{where}: {problem}") from None


# pydantic's location parts that name a member of a union (`bool`, `literal['auto']`), not a keyword
_SCALAR_TAGS = {"bool", "int", "float", "str", "none"}


def _union_member(part: object) -> bool:
    return isinstance(part, str) and (part in _SCALAR_TAGS or any(c in part for c in "[("))


def _fields_at(model: type[BaseModel], location: tuple) -> dict | None:
    """The keywords of the config nested at `location` in `model` (None where there is none)."""
    for part in location:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        kinds = get_args(field.annotation) or (field.annotation,)  # `EmaConfig | None`: its members
        nested = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model.model_fields


def describe_validation(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's errors as one line per keyword: what was given and what is allowed; a value that
    may be of several kinds (a union) gets one line whose requirements are joined by "or". With the
    validated `model`, an unknown keyword in a nested config gets its closest and allowed names."""
    found: dict[object, tuple[str, str, list[str], object]] = {}  # (keyword, kind, messages, given)
    for index, item in enumerate(error.errors()):
        # an unknown or missing keyword's location is the user's own keys (one may be called `bool`)
        named = item["type"] in ("extra_forbidden", "missing")
        keyword = ".".join(str(p) for p in item["loc"] if named or not _union_member(p))
        union = not named and any(_union_member(p) for p in item["loc"])
        _, _, messages, _ = found.setdefault(
            keyword if union else index, (keyword, item["type"], [], item.get("input"))
        )
        messages.append(item["msg"].removeprefix("Value error, "))
    parts = []
    for keyword, kind, messages, given in found.values():
        if kind == "missing":
            parts.append(f"keyword {keyword!r} is required")
        elif kind == "extra_forbidden":
            *parent, name = keyword.split(".")
            fields = _fields_at(model, tuple(parent)) if model is not None else None
            allowed = f"{closest(name, fields)}; allowed: {', '.join(fields)}" if fields else ""
            parts.append(f"unknown keyword {keyword!r}{allowed}")
        elif not keyword:  # a rule across keywords (a model validator): its message names them
            parts.append("; ".join(messages))
        else:
            allowed = " or ".join([messages[0], *(m.removeprefix("Input should be ") for m in messages[1:])])
            parts.append(f"keyword {keyword!r}: {allowed} (given {given!r})")
    return "; ".join(parts)


def parse_config(cls: type[T], data: Any, source: str, context: dict | None = None) -> T:
    """Validate a mapping into a typed config; unknown keys get the closest valid name. `context`
    goes to the config's validators (pydantic's validation context)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CapasError(f"{source}: expected a mapping, got {data!r}")
    for key in data:
        if key not in cls.model_fields:
            raise CapasError(
                f"{source}: unknown key {key!r}{closest(str(key), cls.model_fields)}; allowed: {', '.join(cls.model_fields)}"
            )
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as error:
        raise CapasError(f"{source}: {describe_validation(error, cls)}") from None


def revalidated(config: T, source: str) -> T:
    """A config object validated again, as `parse_config` validates a mapping: pydantic checks a config
    when it is made, not a later assignment (`cfg.epochs = -1`), `model_copy(update=...)` or
    `model_construct`, which then reached training unchecked."""
    return parse_config(type(config), config.model_dump(warnings=False), source)


def flat_items(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {dotted.key: leaf}, to say exactly what differs between two configs."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flat_items(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def unrecorded(old: dict, new: dict) -> str:
    """The settings of `new` that `old` lacks (what an older capas did not record), as opposed to ones it
    records with another value, for them or for a mapping above them: each the shortest dotted key
    absent from `old` (`splits` when it has none of splits' keys), sorted, the first four named
    ("a, b, c, d and 2 more"); empty when `old` records them all."""

    def absent(key: str) -> str | None:
        node, parts = old, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):
                return None
            if part not in node:
                return ".".join(parts[: depth + 1])
            node = node[part]
        return None

    missing = sorted({key for leaf in flat_items(new) if (key := absent(leaf)) is not None})
    return first_of(missing, 4)


def config_changes(old: dict, new: dict) -> list[str]:
    """What differs between two configs, one "dotted.key: old -> new" per changed leaf, sorted by key."""
    before, after = flat_items(old), flat_items(new)
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
