"""The workspace: where code may run from, which files may be read, which agents may be reached.

The caller of a tool may be a prompt-injected assistant, so every import path
and file path it passes is checked here, once, for every consumer (agent
targets, custom simulated users, code scorers, test-case and transcript
files, source introspection):

- Code runs only from files under the workspace roots: the working directory
  plus `--root DIR` / `CONVSIM_ROOTS`. A module path is looked up under the
  roots only, never on sys.path, and the function (or class) it names must be
  defined in a file under a root. The standard library, site-packages and
  convsim's own packages are never code targets, even when they lie under a
  root (a virtualenv inside the project, or the project itself).
- Files are read only under the roots (symlinks resolved first).
- Over network transports the operator decides: code and file arguments are
  refused unless the server runs with `--allow-code`, and HTTP agents are
  reached on loopback only unless `--allow-agent-host HOST`.

Every refusal names the rule and how the operator allows it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import ipaddress
import os
import re
import site
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import InvalidOption, InvalidTarget
from .settings import env_str

HOW_TO_ADD_ROOT = "add its directory with --root DIR or CONVSIM_ROOTS (directories joined by '{sep}')"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class Workspace:
    """What the caller may touch. `roots[0]` is the base that relative paths start from."""

    roots: tuple[Path, ...]
    allow_code: bool = True
    allow_files: bool = True
    agent_hosts: frozenset[str] | None = None  # None: any host; else loopback plus these
    transport: str = "local"  # named in refusals: "the http transport"
    _protected: tuple[Path, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def default(cls, roots: list[str | Path] | tuple[str | Path, ...] = (), *, base: str | Path | None = None,
                **policy: Any) -> Workspace:
        """The working directory (or `base`), then `roots`, then CONVSIM_ROOTS; each must be a directory."""
        entries: list[tuple[str, str | Path]] = [("the working directory", base or Path.cwd())]
        entries += [("--root", r) for r in roots]
        entries += [("CONVSIM_ROOTS", r) for r in (env_str("CONVSIM_ROOTS") or "").split(os.pathsep) if r.strip()]
        resolved: list[Path] = []
        for origin, raw in entries:
            path = Path(raw).expanduser()
            if not path.is_dir():
                raise InvalidOption(f"workspace root {str(raw)!r} (from {origin}) is not a directory")
            path = path.resolve()
            if path not in resolved:
                resolved.append(path)
        return cls(roots=tuple(resolved), _protected=_protected_dirs(), **policy)

    def restricted(self, transport: str, *, allow_code: bool, agent_hosts: list[str]) -> Workspace:
        """The same roots under a network transport's policy."""
        return replace(self, transport=transport, allow_code=allow_code, allow_files=allow_code,
                       agent_hosts=frozenset(h.lower() for h in agent_hosts))

    @property
    def base(self) -> Path:
        return self.roots[0]

    def _roots_text(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def _under_roots(self, path: Path) -> bool:
        return any(path.is_relative_to(r) for r in self.roots)

    def _protection(self, file: Path) -> str | None:
        """What keeps `file` from being a code target, even under a root; None for the project's own code.

        The running interpreter's standard library and site-packages, convsim's own packages, and any
        other Python installation tree: a `site-packages`, a virtualenv or conda environment, a
        `lib/pythonX.Y` standard library, or a directory that pip installed into (`*.dist-info` inside).
        """
        protected = next((p for p in self._protected if file.is_relative_to(p)), None)
        if protected is not None:
            return "convsim's own packages" if protected.name in ("engine", "convsim_mcp") else \
                "site-packages (installed libraries)" if {"site-packages", "dist-packages"} & set(file.parts) else \
                "the Python standard library"
        if {"site-packages", "dist-packages"} & set(file.parts):
            return "site-packages (installed libraries)"
        root = next((r for r in self.roots if file.is_relative_to(r)), None)
        for folder in file.parents:
            if (folder / "pyvenv.cfg").is_file() or (folder / "conda-meta").is_dir():
                return f"a Python environment ({folder})"
            if re.fullmatch(r"python3\.\d+", folder.name) and (folder / "os.py").is_file():
                return f"a Python standard library ({folder})"
            if folder != file.parent and any(folder.glob("*.dist-info")):
                return f"a directory packages were installed into ({folder})"
            if root is None or folder == root:
                break
        return None

    # --- files ----------------------------------------------------------------------------------

    def resolve_file(self, path: str | Path, *, what: str) -> Path:
        """An existing file under a root (relative paths from the base). Raises InvalidOption."""
        if not self.allow_files:
            raise InvalidOption(f"{what} {str(path)!r} is refused: file arguments are not accepted over the "
                                f"{self.transport} transport unless the server is started with --allow-code")
        file = self._absolute(path, what, InvalidOption)
        if not self._under_roots(file):
            raise InvalidOption(f"{what} {str(path)!r} is outside the workspace roots ({self._roots_text()}): files "
                                f"are read only under the roots; {HOW_TO_ADD_ROOT.format(sep=os.pathsep)}")
        if not _is_file(file, what, InvalidOption):
            raise InvalidOption(f"{what} not found: {file}")
        return file

    def _absolute(self, path: str | Path, what: str, error: type[InvalidOption] | type[InvalidTarget]) -> Path:
        """`path` with '~' expanded, from the base when relative, symlinks resolved; `error` if no path can be that."""
        text = str(path)
        if "\0" in text:
            raise error(f"{what} {_clipped(text)} contains a NUL character, which no file name can")
        try:
            raw = Path(text).expanduser()
            return (raw if raw.is_absolute() else self.base / raw).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # '~nosuchuser', a symlink loop, ...
            raise error(f"{what} {_clipped(text)} is not a usable path: {e}") from None

    # --- code -----------------------------------------------------------------------------------

    def code_file(self, path: str, *, what: str) -> tuple[Path, str | None, str]:
        """Where `pkg.module:attr` or `file.py:attr` lives, without importing anything.

        Returns (file, module name or None for a file path, attr). Raises InvalidTarget when the
        spec is malformed, the code is not under a root, or code is refused on this transport.
        """
        module_part, sep, attr = path.strip().rpartition(":")
        if not sep or not module_part or not attr:
            raise InvalidTarget(f"{what} path '{path}' must look like 'pkg.module:func' or 'path/to/file.py:func'")
        if not self.allow_code:
            raise InvalidTarget(f"{what} '{path}' is refused: Python import paths (agents, user agents, code "
                                f"scorers) are not accepted over the {self.transport} transport unless the server "
                                "is started with --allow-code; use an HTTP agent URL instead")
        if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
            file = self._absolute(module_part, what, InvalidTarget)
            self._check_code_file(file, path, what)  # before looking: a refusal says nothing of what exists
            if not _is_file(file, what, InvalidTarget):
                raise InvalidTarget(f"{what} file not found: {file}")
            return file, None, attr
        return self._module_file(module_part, path, what), module_part, attr

    def _module_file(self, name: str, path: str, what: str) -> Path:
        search = [str(r) for r in self.roots]
        parts = name.split(".")
        spec = None
        for i in range(len(parts)):
            try:
                spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                raise InvalidTarget(
                    f"{what} '{path}': cannot find module '{name}' under the workspace roots ({self._roots_text()}). "
                    f"Code runs only from files under the roots: run from the directory that contains it, give a "
                    f"file path like 'path/to/{parts[-1]}.py:{path.rpartition(':')[2]}', or "
                    + HOW_TO_ADD_ROOT.format(sep=os.pathsep))
            search = list(spec.submodule_search_locations or [])
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise InvalidTarget(f"{what} '{path}': module '{name}' has no Python source file under the roots")
        file = Path(spec.origin).resolve()
        self._check_code_file(file, path, what)
        return file

    def _check_code_file(self, file: Path, path: str, what: str) -> None:
        if not self._under_roots(file):
            raise InvalidTarget(f"{what} '{path}' is refused: {file} is outside the workspace roots "
                                f"({self._roots_text()}); code runs only from files under the roots; "
                                + HOW_TO_ADD_ROOT.format(sep=os.pathsep))
        protected = self._protection(file)
        if protected is not None:
            raise InvalidTarget(f"{what} '{path}' is refused: {file} belongs to {protected}, which is never a code "
                                "target; point at a function in your own project")

    def load_callable(self, path: str, *, what: str = "function") -> Callable[..., Any]:
        """Import `pkg.module:attr` or `file.py:attr` from under the roots and return the callable.

        The module file is checked before it is imported (importing runs its code), and the object
        is checked after: it must be defined in a file under the roots, so `mymod:run` does not
        reach a `run` that `mymod` imported from elsewhere. Raises InvalidTarget.
        """
        file, module_name, attr = self.code_file(path, what=what)
        module = _import_file(file, what) if module_name is None else self._import_module(module_name, file, what)
        fn = getattr(module, attr, None)
        if fn is None:
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:15]
            raise InvalidTarget(f"'{path}' not found: the module has no attribute '{attr}' "
                                f"(callables there: {', '.join(public) or 'none'})")
        if not callable(fn):
            raise InvalidTarget(f"'{path}' is not callable")
        defined_in = _defining_file(fn)
        if defined_in is None or not self._under_roots(defined_in) or self._protection(defined_in):
            where = f"in {defined_in}" if defined_in else "in no Python source file"
            raise InvalidTarget(f"{what} '{path}' is refused: '{attr}' is defined {where}, not in a file under the "
                                f"workspace roots ({self._roots_text()}); code runs only from functions defined "
                                "under the roots")
        return fn

    def _import_module(self, name: str, file: Path, what: str) -> Any:
        """Import `name` package by package from the specs found under the roots, never through sys.path.

        A module of the same name elsewhere (the stdlib's `this`, an installed package) is never
        imported in its place; one already imported from elsewhere is refused. The roots go on
        sys.path so that the code can import its own siblings.
        """
        for root in reversed(self.roots):
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
        parts = name.split(".")
        search: list[str] = [str(r) for r in self.roots]
        module: Any = None
        for i in range(len(parts)):
            full = ".".join(parts[: i + 1])
            module = sys.modules.get(full)
            if module is None:
                module = self._exec_spec(full, search, what)
            locations = list(getattr(module, "__path__", None) or [])
            origin = getattr(module, "__file__", None)
            places = [Path(p).resolve() for p in ([origin] if origin else locations)]
            if not places or not all(self._under_roots(p) for p in places):
                raise InvalidTarget(f"{what}: module '{full}' is already imported from "
                                    f"{origin or locations or 'nowhere'}, not from under the workspace roots "
                                    "(another module of that name came first); give a file path instead")
            search = locations
        if Path(getattr(module, "__file__", "") or "").resolve() != file:
            raise InvalidTarget(f"{what}: module '{name}' does not come from {file}; give a file path instead")
        return module

    def _exec_spec(self, full: str, search: list[str], what: str) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(full, search)
        if spec is None:
            raise InvalidTarget(f"cannot import module '{full}' from under the workspace roots")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(full, None)
            if isinstance(e, Exception):
                raise InvalidTarget(f"importing '{full}' failed: {type(e).__name__}: {e}") from e
            raise
        parent, _, child = full.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
        return module

    # --- agents over HTTP -----------------------------------------------------------------------

    def check_agent_url(self, url: str) -> None:
        """Raise InvalidTarget when the transport's policy does not allow this agent host."""
        if self.agent_hosts is None:
            return
        host = (urlsplit(url).hostname or "").lower()
        if _is_loopback(host) or host in self.agent_hosts:
            return
        raise InvalidTarget(f"agent URL host '{host}' is refused over the {self.transport} transport: agents are "
                            f"reached on loopback only unless the server is started with --allow-agent-host {host}")


def as_workspace(value: Workspace | str | Path | None) -> Workspace:
    """A Workspace as given, one rooted at a directory, or the default (working directory, CONVSIM_ROOTS)."""
    if isinstance(value, Workspace):
        return value
    return Workspace.default(base=value)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=1)
def _protected_dirs() -> tuple[Path, ...]:
    """The standard library, every site-packages, and convsim's own packages."""
    dirs: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if sysconfig.get_paths().get(key):
            dirs.add(sysconfig.get_paths()[key])
    for scheme_key in ("stdlib", "platstdlib"):
        base_paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
        if base_paths.get(scheme_key):
            dirs.add(base_paths[scheme_key])
    dirs.update(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.add(site.getusersitepackages())
    dirs.update(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")))
    package_root = Path(__file__).resolve().parent.parent
    dirs.update(str(package_root / name) for name in ("engine", "convsim_mcp"))
    return tuple(sorted({Path(d).resolve() for d in dirs if d}, key=str))


def _is_file(path: Path, what: str, error: type[InvalidOption] | type[InvalidTarget]) -> bool:
    try:
        return path.is_file()
    except OSError as e:  # a name longer than the system allows, ...
        raise error(f"{what} {_clipped(str(path))} cannot be looked up: {e.strerror or e}") from None


def _clipped(text: str, limit: int = 200) -> str:
    """`text` quoted, cut to `limit` characters: a caller's path may be megabytes long."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _import_file(file: Path, what: str) -> Any:
    mod_name = f"_convsim_user_{abs(hash(str(file)))}"
    module = sys.modules.get(mod_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise InvalidTarget(f"cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))  # let the file import its siblings
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise InvalidTarget(f"importing {file} failed: {type(e).__name__}: {e}") from e
    sys.modules[mod_name] = module
    return module


def _defining_file(obj: Any) -> Path | None:
    """The source file that defines a function, class or callable object, if Python knows one."""
    target = inspect.unwrap(obj) if callable(obj) else obj
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target)):
        target = type(target)  # a callable instance: its class's file
    try:
        file = inspect.getsourcefile(target) or inspect.getfile(target)
    except (TypeError, OSError):
        return None
    # "<frozen os>", "<string>": not a file, and never to be mistaken for one under the working directory
    if not file or not os.path.isabs(file) or not os.path.isfile(file):
        return None
    return Path(file).resolve()


WorkspaceArg = Workspace | str | Path | None  # what engine functions accept: a Workspace, a root directory, or the default
