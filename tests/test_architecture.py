"""The shape of the package: imports run one way (dispatcher -> models -> backends), no
module imports itself round a circle, and the backends' table names are the models'."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.db import connection

import django_pubsub
from django_pubsub.backends import base
from django_pubsub.models import Delivery, Message, Subscription, Topic

PACKAGE = Path(django_pubsub.__file__).parent
# What each layer may import from the package, besides itself. Leaf modules (settings,
# states, exceptions, retry delays, input checks, how a handler is called) serve every
# layer.
LEAVES = {"conf", "states", "exceptions", "retry", "signals", "message", "validation", "calling"}
LAYERS = {
    "backends": LEAVES,
    "models": LEAVES | {"backends"},
    "dispatcher": LEAVES
    | {"backends", "models", "sync", "registry", "workers", "retention", "keys", "backpressure"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "migrations":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, but those under ``if TYPE_CHECKING:`` (never imported when it runs)."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports when it runs, anywhere in it (inside
    functions too)."""
    here = name.split(".") if name else []
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = package[: len(package) - (node.level - 1)]
                target += node.module.split(".") if node.module else []
            elif (node.module or "").split(".")[0] == "django_pubsub":
                target = (node.module or "").split(".")[1:]
            else:
                continue
            # "from .. import backends" names a module; "from .models import Delivery" not.
            named = {".".join([*target, alias.name]) for alias in node.names}
            found |= (named & modules.keys()) or {".".join(target)}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("django_pubsub."):
                    found.add(alias.name.removeprefix("django_pubsub."))
    return {module for module in found if module in modules and module != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_layers_import_only_downwards() -> None:
    wrong = []
    for name, imported in _graph().items():
        layer = name.split(".")[0]
        if layer not in LAYERS:
            continue
        for module in imported:
            if module.split(".")[0] not in LAYERS[layer] | {layer}:
                wrong.append(f"{name} imports {module}")
    assert wrong == []


def test_no_module_imports_itself_round_a_circle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for module in sorted(graph[name]):
            visit(module, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_backends_name_the_models_tables() -> None:
    quote = connection.ops.quote_name
    assert base.TOPIC == quote(Topic._meta.db_table)
    assert base.MESSAGE == quote(Message._meta.db_table)
    assert base.SUBSCRIPTION == quote(Subscription._meta.db_table)
    assert base.DELIVERY == quote(Delivery._meta.db_table)
    assert base.OFFSET == quote(Message._meta.get_field("offset").column)


def test_the_layer_check_sees_imports() -> None:
    """It would pass on a package whose imports it failed to read: make sure it reads."""
    graph = _graph()
    assert "backends" in graph["models.log"]  # from .. import backends
    assert "models" in graph["dispatcher.loop"]  # from ..models import Dispatcher, Topic
    assert "dispatcher.claimer" in graph["dispatcher.loop"]  # from .claimer import Claimer
