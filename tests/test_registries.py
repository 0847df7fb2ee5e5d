"""One lazy-registry helper with the same verbs for the five registries (attribution methods, datasets,
editors, LVLMs, CLI commands), and lazy package ``__init__``s whose names IDEs can see."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from medfocus.errors import ConfigError
from medfocus.registry import LazyRegistry


def test_lazy_registry_verbs():
    reg: LazyRegistry = LazyRegistry("widget", {"a": "json:dumps"}, normalize=str.lower)
    assert reg.resolve("A")({"x": 1}) == '{"x": 1}'  # lazy entry imported on use; names normalised
    with pytest.raises(ConfigError, match="widget 'a' is already registered"):
        reg.register("a", len)
    reg.register("a", len, overwrite=True)
    assert reg.resolve("a") is len
    reg.register("b", "json:no_such_function")
    with pytest.raises(ConfigError, match=r"widget 'b' \(json:no_such_function\) could not be imported"):
        reg.resolve("b")
    reg.register("c", "no_such_package.mod:f")
    with pytest.raises(ConfigError, match="No module named 'no_such_package'"):
        reg.resolve("c")
    with pytest.raises(ConfigError, match="unknown widget 'zzz'; available: a, b, c"):
        reg.resolve("zzz")
    assert reg.names() == ["a", "b", "c"]
    reg.unregister("b")
    assert "b" not in reg


def _five():
    """``(register(name, target, overwrite=...), list_fn, existing name, target)`` of each registry."""
    from medfocus import cli
    from medfocus.attribution import list_methods, register_method
    from medfocus.datasets import list_datasets, register_dataset
    from medfocus.editing import list_editors, register_editor
    from medfocus.lvlm import registry as lreg

    def reg_model(name, target, *, overwrite=False):
        lreg.register(lreg.ModelEntry(name, target, "qwen_vl"), overwrite=overwrite)

    def reg_cmd(name, target, *, overwrite=False):
        cli.COMMANDS.register(name, target, overwrite=overwrite)

    def list_cmds():
        return {n: cli.COMMANDS[n] for n in cli.COMMANDS.names()}

    return [
        (register_method, list_methods, "occlusion", "medfocus.attribution.perturbation:RISE"),
        (register_dataset, list_datasets, "vindr_cxr", "medfocus.datasets.padchest_gr:load_padchest_gr"),
        (register_editor, list_editors, "oracle", "medfocus.editing.inpaint:InpaintEditor"),
        (reg_model, lreg.list_models, "demo", "/elsewhere"),
        (reg_cmd, list_cmds, "evaluate", "medfocus.commands.report:report"),
    ]


@pytest.mark.parametrize("i", range(5))
def test_every_registry_refuses_a_duplicate_and_lists_a_dict(i, monkeypatch, tmp_path):
    (tmp_path / "none.yaml").write_text("")  # an empty user registry (a missing one is an error)
    monkeypatch.setenv("MEDFOCUS_MODELS", str(tmp_path / "none.yaml"))
    register, list_fn, existing, target = _five()[i]
    listed = list_fn()
    assert isinstance(listed, dict) and existing in listed  # the same type from every list_*
    with pytest.raises(ConfigError, match="already registered"):
        register(existing, target)
    assert list_fn()[existing] == listed[existing]  # refused: nothing changed


def test_overwrite_replaces(monkeypatch):
    from medfocus.attribution import base
    from medfocus.attribution.perturbation import RISE

    monkeypatch.setitem(base._REGISTRY, "occlusion", base._REGISTRY["occlusion"])  # restored afterwards
    base.register_method("occlusion", RISE, overwrite=True)
    assert type(base.get_method("occlusion")) is RISE


@pytest.mark.parametrize("package", ["medfocus.lvlm", "medfocus.concepts"])
def test_lazy_init_mirrors_every_export_for_type_checkers(package):
    mod = importlib.import_module(package)
    assert mod.__all__ == sorted(mod._EXPORTS)
    tree = ast.parse(Path(mod.__file__).read_text())
    mirrored: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                for alias in imp.names:
                    mirrored[alias.name] = imp.module
    assert mirrored == dict(mod._EXPORTS)  # every lazy name, from the module it is loaded from
    for name in mod.__all__:
        assert name in dir(mod) and getattr(mod, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope
