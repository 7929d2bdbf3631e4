"""Field names and types of library config classes, read without importing them.

Importing transformers costs seconds; the Snakefile plans the DAG on every
invocation, so the allowed `training:` and `lora:` keys are read from the
library sources with `ast` instead (tens of milliseconds, cached per process).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldInfo:
    name: str
    annotation: str  # source text of the type annotation


def _module_tree(module: str) -> ast.Module:
    # find_spec("a.b") imports package "a" (for peft: torch too); find the top
    # package's folder instead and walk to the file.
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"cannot find package {top}")
    base = os.path.join(list(spec.submodule_search_locations)[0], *rest)
    path = base + ".py" if os.path.exists(base + ".py") else os.path.join(base, "__init__.py")
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=path)


def _class_fields(tree: ast.Module, class_name: str) -> tuple[list[FieldInfo], list[str]]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            fields = [
                FieldInfo(stmt.target.id, ast.unparse(stmt.annotation))
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            ]
            bases = [ast.unparse(base) for base in node.bases]
            return fields, bases
    raise LookupError(f"class {class_name} not found")


@functools.lru_cache(maxsize=None)
def dataclass_fields(module: str, class_name: str, base_modules: tuple[str, ...] = ()) -> dict[str, FieldInfo]:
    """Fields of a dataclass, following bases found in `module` or `base_modules`."""
    modules = (module, *base_modules)
    trees = {name: _module_tree(name) for name in modules}
    result: dict[str, FieldInfo] = {}
    pending = [class_name]
    while pending:
        name = pending.pop()
        for tree in trees.values():
            try:
                fields, bases = _class_fields(tree, name)
            except LookupError:
                continue
            for field in fields:
                result.setdefault(field.name, field)
            pending.extend(base.split(".")[-1] for base in bases)
            break
    return result


@functools.lru_cache(maxsize=None)
def enum_values(module: str, class_name: str) -> tuple[str, ...]:
    """String values of an `Enum` class's members."""
    tree = _module_tree(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            values = []
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                    if isinstance(stmt.value.value, str):
                        values.append(stmt.value.value)
            return tuple(values)
    raise LookupError(f"enum {class_name} not found in {module}")


def training_argument_fields() -> dict[str, FieldInfo]:
    return dataclass_fields("transformers.training_args", "TrainingArguments")


def lora_fields() -> dict[str, FieldInfo]:
    return dataclass_fields("peft.tuners.lora.config", "LoraConfig")


def adalora_fields() -> dict[str, FieldInfo]:
    return dataclass_fields("peft.tuners.adalora.config", "AdaLoraConfig", ("peft.tuners.lora.config",))


def optimizer_names() -> tuple[str, ...]:
    return enum_values("transformers.training_args", "OptimizerNames")


def scheduler_names() -> tuple[str, ...]:
    return enum_values("transformers.trainer_utils", "SchedulerType")


def coerce_value(annotation: str, value):
    """Check `value` against a simple annotation; return it, converted where YAML is lax.

    YAML reads `1e-4` (no dot) as a string, so a float field accepts a numeric
    string. Returns (ok, value). Annotations this cannot judge are accepted.
    """
    text = annotation.replace("typing.", "").replace(" ", "")
    optional = "None" in text or text.startswith("Optional[")
    if value is None:
        return optional or text in ("Any",), value
    core = text
    for wrapper in ("Optional[",):
        if core.startswith(wrapper) and core.endswith("]"):
            core = core[len(wrapper) : -1]
    parts = [p for p in core.replace("Union[", "").rstrip("]").split("|") if p != "None"]
    if len(parts) != 1:
        parts = [p for p in core.split(",") if p]
        if len(parts) != 1:
            return True, value
    kind = parts[0]
    if kind == "float":
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return True, int(value)
            return False, value
        return True, value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    return True, value
