"""Which of the user's own modules a mapped function needs on the workers (rank 0 only).

    func ─┬─ its module, if dill sends it by reference (a function importable by name)
          ├─ `import x` / `from x import y` in its code (and in nested functions)
          ├─ globals it reads: modules (by name), functions/classes (their module), other values
          │  (their type's module); functions defined in the script are followed recursively
          └─ closure cells and defaults: the same
                           │ top-level names
                           ▼
    local?  its file lies under the script's directory or rank 0's cwd, and it is not installed
            (site-packages, the standard library, the interpreter's prefix, or any distribution
            importlib.metadata knows -- editable installs count as installed: the nodes have
            the same environment)
                           │ yes
                           ▼
    ship the whole top-level module or package, then read its source (ast) for its own imports
    and repeat, so helpers of helpers come along -- transitively, but only within that tree.

A module is shipped whole at its top level (``mylib`` for ``mylib.sub``): importing a submodule
imports its parents, and a package's relative imports need its siblings.  Explicit ``modules=``
entries follow the same rules, except that an installed module is refused with the fix instead of
being skipped silently.
"""

from __future__ import annotations

import ast
import dis
import functools
import importlib.util
import os
import sys
import sysconfig
import types

from ._errors import BundleError

__all__ = ["detect", "resolve"]

_source_imports: dict = {}  # (path, mtime_ns, size) -> set of top-level names
_installed_tops: set | None = None


def _installed() -> set:
    global _installed_tops
    if _installed_tops is None:
        try:
            from importlib.metadata import packages_distributions

            _installed_tops = set(packages_distributions())
        except Exception:
            _installed_tops = set()
    return _installed_tops


def _system_dirs() -> list[str]:
    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.add(sysconfig.get_paths()[key])
        except KeyError:
            pass
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        dirs.add(p)
    try:
        import site

        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except Exception:
        pass
    return [os.path.realpath(d) for d in dirs if d]


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def default_roots() -> list[str]:
    """The user's source tree: rank 0's cwd and the running script's directory."""
    roots = [os.getcwd()]
    main = sys.modules.get("__main__")
    f = getattr(main, "__file__", None)
    if f:
        roots.append(os.path.dirname(os.path.abspath(f)))
    return [os.path.realpath(r) for r in roots]


def _locate(top: str):
    """(kind, path) of a top-level module on rank 0, or None; never imports it."""
    mod = sys.modules.get(top)
    origin = None
    is_pkg = False
    if mod is not None:
        origin = getattr(mod, "__file__", None)
        is_pkg = hasattr(mod, "__path__")
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        origin = spec.origin if spec.has_location else None
        is_pkg = spec.submodule_search_locations is not None
        if is_pkg and origin is None:
            return ("namespace", None)
    if not origin:
        return ("builtin", None)
    origin = os.path.realpath(origin)
    if is_pkg:
        return ("package", os.path.dirname(origin))
    return ("module", origin)


def _local(top: str, roots) -> tuple[str, str] | None:
    if top in ("__main__", "mpimap") or top in sys.builtin_module_names or \
            top in getattr(sys, "stdlib_module_names", ()):
        return None
    where = _locate(top)
    if where is None or where[1] is None:
        return None
    kind, path = where
    if _under(path, _system_dirs()) or top in _installed():
        return None
    if not _under(path, roots):
        return None
    return kind, path


def _imports_in_code(code, out: set) -> None:
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME" and isinstance(ins.argval, str):
            out.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _imports_in_code(const, out)


def _names_in_code(code, out: set) -> None:
    out.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _names_in_code(const, out)


def _modules_of(obj, seen: set, mods: set, depth: int = 0) -> None:
    """Module names ``obj`` (a function and what it reaches) refers to."""
    if id(obj) in seen or depth > 50:
        return
    seen.add(id(obj))
    if isinstance(obj, types.ModuleType):
        mods.add(obj.__name__)
        return
    if isinstance(obj, functools.partial):
        for v in (obj.func, *obj.args, *(obj.keywords or {}).values()):
            _modules_of(v, seen, mods, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        _modules_of(obj.__func__, seen, mods, depth + 1)
        _modules_of(obj.__self__, seen, mods, depth + 1)
        return
    if isinstance(obj, type):
        mod = getattr(obj, "__module__", None)
        if isinstance(mod, str):
            mods.add(mod)
        if mod == "__main__":
            for v in list(vars(obj).values()):
                if isinstance(v, (types.FunctionType, staticmethod, classmethod, property)):
                    _modules_of(getattr(v, "__func__", getattr(v, "fget", v)), seen, mods,
                                depth + 1)
        return
    if not isinstance(obj, types.FunctionType):
        mod = getattr(type(obj), "__module__", None)
        if isinstance(mod, str) and mod != "builtins":
            mods.add(mod)
            if mod == "__main__":
                _modules_of(type(obj), seen, mods, depth + 1)
        return
    mods.add(obj.__module__ or "__main__")
    code = obj.__code__
    imported: set = set()
    _imports_in_code(code, imported)
    pkg = obj.__module__.rpartition(".")[0] if obj.__module__ else ""
    for name in imported:
        mods.add(name if name or not pkg else pkg)
    names: set = set()
    _names_in_code(code, names)
    g = obj.__globals__
    for name in names:
        if name in g:
            _modules_of(g[name], seen, mods, depth + 1)
    for cell in obj.__closure__ or ():
        try:
            _modules_of(cell.cell_contents, seen, mods, depth + 1)
        except ValueError:  # an empty cell
            pass
    for v in (obj.__defaults__ or ()) + tuple((obj.__kwdefaults__ or {}).values()):
        _modules_of(v, seen, mods, depth + 1)


def _imports_in_source(path: str) -> set:
    """Top-level names imported anywhere in a .py file (absolute imports only)."""
    try:
        st = os.stat(path)
    except OSError:
        return set()
    key = (path, st.st_mtime_ns, st.st_size)
    cached = _source_imports.get(key)
    if cached is not None:
        return cached
    names = set()
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    _source_imports[key] = names
    return names


def _sources(kind, path):
    if kind == "module":
        return [path] if path.endswith(".py") else []
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return out


def _close_over(found: dict, roots) -> None:
    """Add the local modules that the modules in ``found`` import, transitively."""
    todo = list(found)
    while todo:
        kind, path = found[todo.pop()][:2]
        for src in _sources(kind, path):
            for top in _imports_in_source(src):
                if top in found:
                    continue
                hit = _local(top, roots)
                if hit is not None:
                    found[top] = hit
                    todo.append(top)


def detect(funcs, roots=None) -> list[tuple[str, str, str]]:
    """[(top-level name, "module"|"package", path)] of local modules ``funcs`` need."""
    roots = default_roots() if roots is None else roots
    mods: set = set()
    seen: set = set()
    for f in funcs:
        if f is None:
            continue
        try:
            _modules_of(f, seen, mods)
        except Exception:  # detection is a convenience: never fail a map over it
            continue
    found = {}
    for name in mods:
        top = name.split(".")[0]
        if top and top not in found:
            hit = _local(top, roots)
            if hit is not None:
                found[top] = hit
    _close_over(found, roots)
    return sorted((top, kind, path) for top, (kind, path) in found.items())


def resolve(spec, roots=None) -> tuple[list, set]:
    """modules= entries -> ([(top-level name, kind, path)], names given explicitly); errors name
    the entry and the fix. The local modules they import come along (transitively)."""
    if spec is None:
        return [], set()
    if isinstance(spec, (str, types.ModuleType)):
        spec = [spec]
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"modules= must be a list of module names or modules, not "
                        f"{type(spec).__name__}") from None
    roots = default_roots() if roots is None else roots
    found = {}
    for item in items:
        if isinstance(item, types.ModuleType):
            name = item.__name__
        elif isinstance(item, str) and item.strip():
            name = item.strip()
        else:
            raise TypeError(f"modules=: expected a module name (str) or a module, got "
                            f"{type(item).__name__} {item!r}")
        top = name.split(".")[0]
        if top == "__main__":
            raise BundleError("modules=: __main__ (your script) is not shipped as a module: its "
                              "functions already travel by value")
        if top in found:
            continue
        where = _locate(top)
        if where is None:
            raise BundleError(f"modules=: no module named {top!r} on rank 0 (looked in "
                              f"sys.path: {sys.path[:4]}...)")
        kind, path = where
        if kind == "namespace":
            raise BundleError(f"modules=: {top!r} is a namespace package (no __init__.py); add "
                              f"an __init__.py so it can be shipped as one directory")
        if kind == "builtin" or path is None:
            raise BundleError(f"modules=: {top!r} is built into Python; nothing to ship")
        if _under(path, _system_dirs()):
            raise BundleError(f"modules=: {top!r} is installed ({path}); modules= ships your own "
                              f"source modules. Install {top!r} in the environment the nodes "
                              f"use instead.")
        found[top] = (kind, path)
    explicit = set(found)
    _close_over(found, roots)
    return sorted((top, kind, path) for top, (kind, path) in found.items()), explicit
