"""Every Example section in the library's docstrings runs, and prints what it says it prints."""

import doctest
import importlib
import pkgutil

import pytest

import keras_vg
import tb_plugin

MODULES = sorted(
    name
    for package in (keras_vg, tb_plugin)
    for _, name, _ in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"


def test_every_module_is_examined():
    assert {"keras_vg.monitor", "keras_vg.detect.streaming", "keras_vg.clipping.zscore", "tb_plugin.plugin"} <= set(
        MODULES)
