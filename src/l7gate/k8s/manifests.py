"""Manifest files → Kubernetes objects (plain dicts), each tagged with where it came from.

The one place YAML text is read. A path may be a file or a folder (searched recursively for
`.yaml`, `.yml` and `.json`, in sorted order). Multi-document files and `kind: List` are
flattened. A syntax error names the file, line and column; it stops that file only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class Manifest:
    source: str  # file path, or "<stdin>"
    index: int  # document index within the source, from 0
    line: int  # 1-based line where the document starts
    obj: Any

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", "")) if isinstance(self.obj, dict) else ""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True)
class LoadError:
    source: str
    message: str
    missing: bool = False  # the path itself is wrong (a usage error), not its content

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


def expand_paths(paths: Iterable[str]) -> tuple[list[str], list[LoadError]]:
    files: list[str] = []
    errors: list[LoadError] = []
    for p in paths:
        if p == "-":
            files.append(p)
        elif os.path.isdir(p):
            found: list[str] = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                found.extend(
                    os.path.join(root, n) for n in sorted(names) if n.endswith(MANIFEST_SUFFIXES)
                )
            if not found:
                errors.append(LoadError(p, "folder holds no .yaml, .yml or .json file", missing=True))
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            errors.append(LoadError(p, "no such file or folder", missing=True))
    return files, errors


def parse_text(text: str, source: str) -> tuple[list[Manifest], list[LoadError]]:
    out: list[Manifest] = []
    try:
        loader = yaml.SafeLoader(text)
        try:
            index = 0
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    break
                line = node.start_mark.line + 1
                obj = loader.construct_document(node)
                if obj is None:
                    continue  # an empty document (e.g. a trailing `---`)
                if isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
                    for item in obj["items"]:
                        out.append(Manifest(source, index, line, item))
                        index += 1
                else:
                    out.append(Manifest(source, index, line, obj))
                    index += 1
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        return out, [LoadError(source, f"{where}{what}")]
    except yaml.YAMLError as exc:
        return out, [LoadError(source, f"invalid YAML: {exc}")]
    return out, []


def load(paths: Iterable[str], stdin_text: str | None = None) -> tuple[list[Manifest], list[LoadError]]:
    files, errors = expand_paths(paths)
    manifests: list[Manifest] = []
    for f in files:
        if f == "-":
            text = stdin_text or ""
            source = "<stdin>"
        else:
            try:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(LoadError(f, f"cannot read: {exc}"))
                continue
            source = f
        ms, errs = parse_text(text, source)
        manifests.extend(ms)
        errors.extend(errs)
    return manifests, errors
