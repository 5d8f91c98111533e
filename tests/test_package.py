"""The package's shape: the public API, and no import cycle among its modules."""

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "src" / "subnets"


def module_name(path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> set[str]:
    """The subnets modules a file imports, wherever the import statement is (TYPE_CHECKING blocks
    and function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("subnets"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("subnets"))
    return found


def test_no_import_cycle_among_the_packages_modules():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()
    }
    # A package's __init__ re-exports its modules; only cycles through other modules count.
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph = {
        n: {m for m in deps if m not in packages or not n.startswith(m + ".")} for n, deps in graph.items()
    }
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_public_api_imports_in_a_fresh_interpreter():
    names = ["MaskedOptimizer", "unit_importance", "MAML", "MetaTask", "HeadGates", "Subnetwork", "SubnetworkSet",
             "fisher_information", "select_keep_ratio", "select_top_k", "iterative_pruning", "conflict_matrix",
             "linear_cka", "typological_similarity", "overlap_typology_correlation", "compose_config", "run",
             "Run", "Method", "MaskPolicy", "StepStrategy", "StaticMasks", "DynamicMasks", "MAMLEpisodes"]  # fmt: skip
    code = f"import subnets; missing = [n for n in {names!r} if not hasattr(subnets, n)]; print(missing)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    import subnets

    assert sorted(subnets.__all__) == sorted(set(subnets.__all__))
    assert all(hasattr(subnets, name) for name in subnets.__all__)


# The package's layers, lowest first: a module imports only from layers below its own (issue 39).
# Exempt: the package's __init__ (the public API re-exports every layer) and the ``python -m`` shims,
# which only call their command-line module.
LAYERS = [
    {"config", "configs", "files", "progress", "runs.results", "runs.checkpoint_schema", "training.guards"},
    {"data", "parallel.distributed", "runs.folder", "runs.checkpoint", "training.tracking"},
    {"metrics", "models", "runs.identity", "runs.trained_folder"},
    {"parallel.sharding"},
    {"optim"},
    {"masks"},  # the subnetwork core
    {"training.update", "analysis"},
    {"meta", "tasks"},
    {"methods"},
    {"evaluate", "training.state", "training.callbacks"},  # scoring and few-shot; the recipe's parts
    {"training.assemble"},
    {"training.runner"},  # the recipe
    {"runs.trained"},  # trained runs reused
    {"hf", "report"},
    {"cli"},
]
SHIMS = {"train", "evaluate.__main__", "report.__main__", "consolidate", "export", "parse", "predict"}
# What a Run holds that nothing else does: a parameter read for these is the recipe handed down.
RUN_ATTRIBUTES = {"state", "cfg", "parallel", "paths", "callbacks", "evaluator", "clock", "tracker", "guard",
                  "sampler", "scheduler", "optimizer", "batches", "analyses", "parts"}  # fmt: skip


UNITS = set().union(*LAYERS)
FOLDERS = {"training", "runs", "parallel"}  # folders whose modules sit in different layers


def unit_of(module: str) -> str:
    """``subnets.training.runner`` -> ``training.runner``; ``subnets.masks.core`` -> ``masks``."""
    parts = module.split(".")[1:]
    return ".".join(parts[:2]) if parts[0] in FOLDERS and len(parts) > 1 else parts[0]


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit_of(module) in layer)


def test_every_module_has_a_layer_and_imports_only_from_the_layers_below():
    """No import from a lower module to a higher one (e.g. the model builder importing the tasks,
    the trained-run loader building a Run, few-shot and evaluation importing each other), wherever
    the import is: function bodies and TYPE_CHECKING blocks included."""
    names = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = {name for name in names if name != "subnets" and name.removeprefix("subnets.") not in FOLDERS}
    units = {unit_of(name) for name in modules}
    assert units - SHIMS - {"__main__"} == UNITS, (
        "each top-level module, package or folder module has one layer"
    )
    upward = []
    for name in sorted(modules):
        if name.removeprefix("subnets.") in SHIMS:
            continue
        for imported in imports_of(names[name]):
            if imported == "subnets" or imported.removeprefix("subnets.") in FOLDERS:
                continue
            if unit_of(imported) == unit_of(name):
                continue
            if (
                imported.split(".")[1] not in units | FOLDERS
            ):  # a name from the package's root: the public API
                upward.append(f"{name} imports {imported} (the package's public API)")
            elif unit_of(imported) not in UNITS:  # a name imported from a folder's __init__
                upward.append(f"{name} imports {imported} (import the module inside the folder)")
            elif layer_of(imported) >= layer_of(name):
                upward.append(f"{name} imports {imported}")
    assert not upward, upward


def test_no_function_below_the_recipe_takes_the_run():
    """Below the recipe (subnets.training.runner) functions are handed what they use, never the Run: no
    parameter of any other module is read for what only a Run holds (its state, settings, folder,
    processes, optimizer, callbacks...), and only the public API and the training command import
    the runner. Failed before issue 39's seams (the results writer, few-shot, callbacks and
    checkpoint functions took the run; the evaluation built one)."""
    taking = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runner.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]}
            read = {(n.value.id, n.attr) for n in ast.walk(node)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in names}  # fmt: skip
            for parameter, attribute in read:
                if parameter in ("run", "training", "experiment") and attribute in RUN_ATTRIBUTES:
                    taking.append(f"{path.relative_to(PACKAGE)}: {node.name}({parameter}.{attribute})")
    assert not taking, taking
    importing = {module_name(p) for p in PACKAGE.rglob("*.py") if "subnets.training.runner" in imports_of(p)}
    assert importing <= {"subnets", "subnets.cli.train"}, importing


def test_every_console_script_is_a_cli_module():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {
        "subnets-train",
        "subnets-evaluate",
        "subnets-predict",
        "subnets-parse",
        "subnets-report",
    }
    assert all(target.startswith("subnets.cli.") for target in scripts.values())


def test_checkpoint_keys_are_defined_once():
    """A checkpoint's keys are named once, in subnets.runs.checkpoint_schema (issue 39): every module that
    writes or reads a checkpoint uses those names, never the strings. Checked: the keys no other
    part of the package uses as a key (a string used as an index ``x["sampler"]``, a dict key, a
    membership test ``"sharded" in x``, the first argument of ``x.get``/``x.pop``, or a keyword
    of ``x.update(...)``/``dict(...)``), so that a hit is a checkpoint key spelled out. The other
    keys are common words used legitimately elsewhere: ``"step"``, ``"metric"`` and ``"method"`` in
    records and results, ``"model"`` in run.json's identity, ``"optimizer"`` in the few-shot
    settings, ``"rng"`` in the sampler's own state, ``"divergence"`` in results.json's status."""
    keys = {"rng_ranks", "sharded", "scheduler", "sampler", "world_size"}

    def spelled(node) -> list[str]:
        strings = []
        if isinstance(node, ast.Subscript):
            strings.append(node.slice)
        elif isinstance(node, ast.Dict):
            strings += [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            strings.append(node.left)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("get", "pop", "setdefault") and node.args:
                strings.append(node.args[0])
            if name in ("update", "dict"):
                return [k.arg for k in node.keywords if k.arg in keys]
        return [s.value for s in strings if isinstance(s, ast.Constant) and s.value in keys]

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "checkpoint_schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {key!r}" for key in spelled(node)]
    heading = "checkpoint keys spelled out, not subnets.runs.checkpoint_schema's names:"
    assert not found, "\n".join([heading, *found])
