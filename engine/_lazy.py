"""Packages whose public names are imported from their modules on first use (PEP 562).

`import convsim_mcp.server` must stay light so that the MCP server answers `tools/list` fast: it needs the
models that make up its schemas, not the simulation, judging and generation stacks behind its tools. A
package lists where each of its names lives and imports the module when the name is first read:

    __getattr__, __dir__ = lazy_exports(__name__, {"simulate": ".simulation", ...})

The package keeps the same imports under `if TYPE_CHECKING:`, for type checkers and for the layout test.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: name -> relative module that defines it ('.simulation')."""
    module = importlib.import_module(package)

    def __getattr__(name: str) -> Any:
        source = where.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source, package), name)
        setattr(module, name, value)  # once read, a plain attribute: no further lookups
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(where))

    return __getattr__, __dir__


def deferred(module: str, *names: str) -> Any:
    """Stand-ins for the functions `names` of `module`, imported at the first call of one of them.

    For a caller that needs a job's entry points only when a request comes (the MCP server's tools), so that
    importing the caller does not import the stacks behind them. One name: its stand-in; several: a tuple.
    """
    def stand_in(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(module), name)(*args, **kwargs)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = f"`{module}.{name}`, imported at the first call (engine/_lazy.py)."
        return call

    found = tuple(stand_in(n) for n in names)
    return found[0] if len(found) == 1 else found
