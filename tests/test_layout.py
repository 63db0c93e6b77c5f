"""The package's layers, read from its imports: dependencies point one way, no circles, private APIs in one place.

Layers, lowest first; a module may import its own layer and those below:

    errors <- config, loss_weighting, task_mixing, _compat <- core <- data <- run <- programs <- the public API and the `python -m` modules
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "mto_tf"

# Each module's layer is that of the longest prefix named here; "mto_tf" itself names the top-level modules only.
LAYERS = {
    "mto_tf.errors": 0,
    "mto_tf.config": 1,
    "mto_tf.loss_weighting": 1,
    "mto_tf.task_mixing": 1,
    "mto_tf._compat": 1,
    "mto_tf.core": 2,
    "mto_tf.data": 3,
    "mto_tf.run": 4,
    "mto_tf.programs": 5,
    # The top: the public API (`from mto_tf import train, TrainConfig`) and `python -m mto_tf[.program]`.
    "mto_tf": 6,
}
PRIVATE_APIS = ("keras.src", "tensorflow.python")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int | None:
    """The module's layer; None for a module in a subpackage that LAYERS does not name."""
    prefixes = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    prefix = max(prefixes, key=len)
    top_level = module.count(".") <= 1
    return LAYERS[prefix] if prefix != "mto_tf" or top_level else None


def _imports(module: str) -> list[tuple[str, int]]:
    """Every module `module` imports, anywhere in it (functions too), with the line: mto_tf's and others'."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                # `from mto_tf.core import step` imports the module mto_tf.core.step.
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule if submodule in MODULES else node.module, node.lineno))
    return found


def _mto_tf_imports(module: str) -> set[str]:
    return {name for name, _ in _imports(module) if name in MODULES and name != module}


def test_the_layers_cover_every_module():
    assert set(MODULES) >= {"mto_tf", "mto_tf.config", "mto_tf.errors", "mto_tf._compat", "mto_tf.core.step",
                            "mto_tf.run.custom_loop", "mto_tf.programs.flags"}
    for module in MODULES:
        assert _layer(module) is not None, f"{module}: its subpackage has no layer in LAYERS"
    # A subpackage nobody placed gets no layer (rather than the top one).
    assert _layer("mto_tf.newpackage.module") is None and _layer("mto_tf.explain") == LAYERS["mto_tf"]


# What a module may import of mto_tf's own, beyond what its layer allows: the seams the design keeps.
KNOWS_NOTHING_OF = {
    # The fixed step is the seed's answer: an adaptive method plugs in through its one parameter.
    "mto_tf.core.step": ("mto_tf.core.weighting",),
    # The driver of steps knows nothing about losses; the step nothing about checkpoints.
    "mto_tf.run.custom_loop": ("mto_tf.core.losses", "mto_tf.core.objective", "mto_tf.core.weighting",
                               "mto_tf.core.gradient_shares"),
}


@pytest.mark.parametrize("module", KNOWS_NOTHING_OF)
def test_the_step_and_the_loop_keep_their_seams(module):
    for imported in _mto_tf_imports(module):
        assert not imported.startswith(KNOWS_NOTHING_OF[module]), f"{module} imports {imported}"


# A module may act when imported only to do its job: the version check, absl's flag definitions.
RUNS_ON_IMPORT = {"mto_tf._compat": "check_versions()", "mto_tf.programs.flags": "define_flags()"}


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_module_changes_nothing_else(module):
    """No module-level call but the ones above: importing mto_tf installs no filter, handler or setting."""
    body = ast.parse(MODULES[module].read_text()).body
    calls = [ast.unparse(node) for index, node in enumerate(body) if isinstance(node, ast.Expr)
             and not (index == 0 and isinstance(node.value, ast.Constant))]
    assert calls in ([], [RUNS_ON_IMPORT.get(module)]), f"{module} runs {calls} when imported"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layers(module):
    for imported in _mto_tf_imports(module):
        assert _layer(imported) <= _layer(module), (
            f"{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)}), a higher layer")


def test_no_import_circles():
    graph = {module: _mto_tf_imports(module) for module in MODULES}
    state: dict[str, str] = {}  # "visiting" while on the path, "done" after.

    def visit(module: str, path: list[str]) -> None:
        state[module] = "visiting"
        for imported in sorted(graph[module]):
            if state.get(imported) == "visiting":
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(imported):], imported]))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", MODULES)
def test_private_keras_and_tensorflow_apis_only_in_compat(module):
    private = [(name, line) for name, line in _imports(module) if name.startswith(PRIVATE_APIS)]
    if module != "mto_tf._compat":
        assert not private, f"{module} imports {private}: put it behind a function in mto_tf/_compat.py"


@pytest.mark.parametrize("module", MODULES)
def test_imports_come_first_so_none_depends_on_code_run_before_it(module):
    """Module-level imports before any other statement: no module needs another's side effect first."""
    body = ast.parse(MODULES[module].read_text()).body
    seen_code = False
    for node in body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is body[0]
        if isinstance(node, ast.Import | ast.ImportFrom):
            assert not seen_code, f"{module}:{node.lineno}: an import after module-level code"
        elif not docstring:
            seen_code = True


def test_the_compat_version_check_refuses_other_versions():
    from mto_tf import _compat

    _compat.check_versions()  # The installed versions are the pinned ones.
    with pytest.raises(RuntimeError, match=r"mto_tf needs TensorFlow 2\.21\.x .* found 2\.22\.0"):
        _compat.check_versions(tensorflow_version="2.22.0")
    with pytest.raises(RuntimeError, match=r"mto_tf needs Keras 3\.15\.x .* found 3\.16\.1"):
        _compat.check_versions(keras_version="3.16.1")
    # The pin it checks is the one pyproject.toml installs.
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert f'"tensorflow~={_compat.PINNED_TENSORFLOW}.0"' in pyproject
