"""Every fenced ``python`` example in a public docstring of keras_es runs as pasted.

The examples of every public class, function and method of every keras_es module are
collected and each runs in a fresh namespace: it must import what it uses and build
its data inline (small NumPy arrays), as a user pasting it would.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_es"

# Examples that are not yet self-contained; each owner removes its entry when the
# example runs (pytest reports an entry whose example passes as XPASS).
PENDING: set[str] = set()

# Examples that train for seconds: the statistical tier, not the fast one.
SLOW = {
    "keras_es.engine.keras_system.KerasSystem",
}

_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


def _documented(module):
    """``(qualified name, object)`` of the module and of its public classes,
    functions and methods defined in it."""
    yield module.__name__, module
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            yield f"{module.__name__}.{name}", value
        elif inspect.isclass(value):
            yield f"{module.__name__}.{name}", value
            for attribute, member in vars(value).items():
                if attribute.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    yield f"{module.__name__}.{name}.{attribute}", member


def _examples():
    params = []
    for module_name in _module_names():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # reported as a failing example of the module
            params.append(pytest.param(module_name, f"raise {error!r}", id=module_name))
            continue
        for name, value in _documented(module):
            blocks = _FENCE.findall(inspect.cleandoc(value.__doc__ or ""))
            for index, code in enumerate(blocks):
                example = name if len(blocks) == 1 else f"{name}[{index}]"
                marks = []
                if example in PENDING:
                    marks.append(pytest.mark.xfail(
                        strict=False, reason=f"{example}: example not yet self-contained "
                                            "(PENDING in tests/test_docstring_examples.py)"))
                if example in SLOW:
                    marks.append(pytest.mark.slow)
                params.append(pytest.param(example, textwrap.dedent(code), id=example,
                                           marks=marks))
    return params


EXAMPLES = _examples()


@pytest.mark.slow
@pytest.mark.parametrize("name, code", EXAMPLES)
def test_docstring_example_runs(name, code):
    exec(compile(code, f"<docstring example of {name}>", "exec"), {"__name__": "__main__"})


def test_pending_and_slow_name_existing_examples():
    names = {param.values[0] for param in EXAMPLES}
    assert not (PENDING | SLOW) - names, (
        f"PENDING/SLOW name examples that no docstring has: {sorted((PENDING | SLOW) - names)}")
