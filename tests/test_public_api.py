"""The public surface cannot drift: the root's ``__all__``, the API page, the README's
layout list and the module files agree, and ``import keras_es`` stays light."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import keras_es

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "keras_es"


def _section(text: str, heading: str) -> str:
    """The text from ``heading`` to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    following = re.search(rf"^{level} ", text[start + len(heading):], flags=re.M)
    return text[start: start + len(heading) + following.start()] if following \
        else text[start:]


def _modules() -> set[str]:
    """Every module file of the package, as a path inside ``keras_es/``."""
    return {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
            if path.name != "__init__.py"}


def test_all_is_the_root_documented_in_the_api_page():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = re.findall(r"^- \[`keras_es\.(\w+)`\]", _section(api, "## The package root"),
                            flags=re.M)
    assert len(documented) == len(set(documented)), f"listed twice: {documented}"
    assert set(keras_es.__all__) == set(documented), (
        f"keras_es.__all__ and docs/api.md's package root differ: only in __all__ "
        f"{sorted(set(keras_es.__all__) - set(documented))}, only in docs/api.md "
        f"{sorted(set(documented) - set(keras_es.__all__))}")
    assert len(keras_es.__all__) == len(set(keras_es.__all__))


def test_every_root_name_is_a_class_or_function_not_a_module():
    for name in keras_es.__all__:
        value = getattr(keras_es, name)
        assert not isinstance(value, type(os)), f"keras_es.__all__ lists the module {name}"


def test_every_module_is_in_the_readme_layout_and_the_api_page():
    readme = (ROOT / "README.md").read_text()
    layout = _section(readme, "## Layout")
    entry = layout[layout.index("keras_es/"): layout.index("\ntests/")]
    listed = set(re.findall(r"[\w/]+\.py", entry))
    modules = _modules()
    assert listed == modules, (
        f"README's layout and keras_es/ differ: files not listed "
        f"{sorted(modules - listed)}, listed but missing {sorted(listed - modules)}")
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: keras_es\.([\w.]+)$", api, flags=re.M))
    expected = {name[:-len(".py")].replace("/", ".") for name in modules}
    assert documented == expected, (
        f"docs/api.md and keras_es/ differ: modules without a '::: keras_es.<module>' "
        f"{sorted(expected - documented)}, documented but missing "
        f"{sorted(documented - expected)}")


def test_submodules_load_on_first_use():
    assert keras_es.layers.UnitMask is not None
    assert "ESOracle" in dir(keras_es)


@pytest.mark.slow
def test_importing_keras_es_does_not_import_keras_tuner():
    code = ("import sys, keras_es; "
            "print('keras_tuner' in sys.modules, 'keras_es.tuner.oracle' in sys.modules); "
            "keras_es.ESSearch; print('keras_tuner' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                         timeout=300)
    # Not imported by keras_es; imported on first use of the integration.
    assert out.stdout.split() == ["False", "False", "True"], out.stderr[-2000:]
