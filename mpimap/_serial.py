"""How objects cross ranks.

Two codecs share one wire shape, ``Packed(codec, data, buffers)``:

* code (the mapped function, its captured data): dill with ``recurse=True``, so a function from the
  script's ``__main__``, a lambda or a closure is sent by value together with the globals it uses, and
  a worker that never ran the script can call it;
* data (items, results, exceptions, common data): C pickle protocol 5. When plain pickle cannot carry
  an object (a lambda, a local class) or when, going to a worker, the stream names ``__main__`` (the
  worker's ``__main__`` is not the script), the same object is re-pickled with dill on the same path.

In both codecs numpy arrays leave the stream as protocol-5 out-of-band buffers: they are never copied
into the pickle bytes, they travel as raw MPI buffers, and they are rebuilt zero-copy from the receive
buffer. dill's own numpy handling would put them in-band, so our dill Pickler routes ndarrays through
``__reduce_ex__(5)``.

Class identity across ranks: a class defined in the script arrives on a worker by value (inside the
function's globals). The worker registers such classes in its ``__main__`` namespace, so its results
and exceptions pickle *by reference* (``__main__.Foo``) and rank 0 rebuilds them as its own ``Foo``:
``isinstance`` and ``except MyError`` work on rank 0. A by-value ``__main__`` class arriving where a
class of that name already exists resolves to the existing one.
"""

from __future__ import annotations

import importlib
import io
import pickle
import sys
import types
import weakref
from typing import Any, NamedTuple

import dill

from ._errors import SerializationError

__all__ = [
    "CODEC_DILL",
    "CODEC_PICKLE",
    "Packed",
    "ReadOnlyDict",
    "ReadOnlyList",
    "ReadOnlySet",
    "dumps_code",
    "dumps_data",
    "fingerprint",
    "freeze",
    "loads",
    "register_main_classes",
]

CODEC_PICKLE = 0
CODEC_DILL = 1
_PROTOCOL = 5
_MAIN_MARK = b"__main__"


class Packed(NamedTuple):
    """A serialised object: ``data`` is the pickle stream, ``buffers`` its out-of-band buffers."""

    codec: int
    data: bytes
    buffers: list

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(memoryview(b).nbytes for b in self.buffers)


def _ndarray_type():
    np = sys.modules.get("numpy")
    return None if np is None else np.ndarray


class _DillPickler(dill.Pickler):
    """dill, with two changes.

    Plain ndarrays go out-of-band (dill would copy them into the stream). Modules always go by
    name: dill pickles a module that is not under site-packages (the user's own ``mylib.py``,
    an editable install) *with its whole namespace*; a worker imports it instead.
    """

    def reducer_override(self, obj):
        t = type(obj)
        if t is types.ModuleType and obj.__name__ != "__main__":
            return (importlib.import_module, (obj.__name__,))
        nd = _ndarray_type()
        if nd is not None and t is nd:
            return obj.__reduce_ex__(_PROTOCOL)
        return NotImplemented


def _dill_dumps(obj) -> Packed:
    buffers: list = []
    out = io.BytesIO()
    _DillPickler(out, protocol=_PROTOCOL, buffer_callback=buffers.append, byref=False,
                 recurse=True).dump(obj)
    return Packed(CODEC_DILL, out.getvalue(), [b.raw() for b in buffers])


def dumps_code(obj, what: str) -> Packed:
    """Serialise a function (or anything that may hold functions) by value with dill.

    ``what`` names the object in error messages ("the function `f`", "common").
    """
    try:
        return _dill_dumps(obj)
    except Exception as exc:
        raise SerializationError(_explain_dumps_failure(obj, what, exc)) from exc


def dumps_data(obj, to_worker: bool) -> Packed:
    """Serialise data: C pickle (fast), dill where plain pickle cannot carry the object.

    ``to_worker``: a stream naming ``__main__`` is re-pickled with dill, because a worker's
    ``__main__`` is not the script (rank 0's is, so results may keep ``__main__`` references).
    Raises the underlying exception if neither codec can serialise ``obj``.
    """
    buffers: list = []
    try:
        data = pickle.dumps(obj, protocol=_PROTOCOL, buffer_callback=buffers.append)
    except Exception:
        data = None
    if data is not None and not (to_worker and _MAIN_MARK in data):
        return Packed(CODEC_PICKLE, data, [b.raw() for b in buffers])
    return _dill_dumps(obj)


class _Unpickler(dill.Unpickler):
    """dill's Unpickler, resolving by-value ``__main__`` classes to the receiver's ``__main__``."""

    def find_class(self, module, name):
        if module in ("dill._dill", "dill.dill") and name == "_create_type":
            return _reconcile_type
        return super().find_class(module, name)


# Workers set this: their __main__ is a namespace mpimap owns, where arriving classes are registered.
_REGISTER_IN_MAIN = False


def _reconcile_type(typeobj, name, bases, namespace, *rest):
    qualname = namespace.get("__qualname__", name)
    if namespace.get("__module__") == "__main__" and qualname == name:
        main = sys.modules.get("__main__")
        existing = getattr(main, name, None)
        if isinstance(existing, type) and existing.__qualname__ == qualname and \
                getattr(existing, "__module__", None) == "__main__":
            return existing
        cls = typeobj(name, bases, namespace, *rest)
        if _REGISTER_IN_MAIN and main is not None:
            setattr(main, name, cls)
        return cls
    return typeobj(name, bases, namespace, *rest)


def register_main_classes(func_globals: dict) -> None:
    """Put the script-level classes and functions a loaded function uses into ``__main__``.

    Classes are registered by ``_reconcile_type`` as they arrive; functions (items or results may
    reference them) are registered here. Only top-level names defined in ``__main__``.
    """
    main = sys.modules.get("__main__")
    if main is None or not _REGISTER_IN_MAIN:
        return
    for name, value in list(func_globals.items()):
        if isinstance(value, (types.FunctionType, type)) and \
                getattr(value, "__module__", None) == "__main__" and \
                getattr(value, "__qualname__", None) == name and not hasattr(main, name):
            setattr(main, name, value)


def loads(codec: int, data, buffers=(), readonly: bool = False) -> Any:
    """Rebuild an object; arrays are built on ``buffers`` without a copy (read-only if asked)."""
    if readonly:
        buffers = [memoryview(b).toreadonly() for b in buffers]
    if codec == CODEC_PICKLE:
        return pickle.loads(data, buffers=buffers)
    return _Unpickler(io.BytesIO(data), buffers=buffers).load()


def roundtrip(packed: Packed, readonly: bool = False):
    return loads(packed.codec, packed.data, packed.buffers, readonly=readonly)


# ----------------------------------------------------------------------------------------------
# Error messages that name the culprit

def _short(obj, limit=80):
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _try_dill(obj) -> Exception | None:
    try:
        _dill_dumps(obj)
    except Exception as exc:
        return exc
    return None


def _referenced_globals(func: types.FunctionType):
    names = set()

    def walk(code):
        names.update(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    walk(func.__code__)
    g = func.__globals__
    return [(n, g[n]) for n in sorted(names) if n in g]


def _find_culprit(obj, path: str, depth: int = 0, seen=None):
    """Walk into ``obj`` to the innermost part that does not serialise; (path, part, error)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return None
    seen.add(id(obj))
    children = []
    if isinstance(obj, types.FunctionType):
        for name, value in _referenced_globals(obj):
            if not isinstance(value, types.ModuleType):
                children.append((f"global `{name}` used by {obj.__qualname__}()", value))
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                children.append((f"closure variable `{name}` of {obj.__qualname__}()",
                                 cell.cell_contents))
            except ValueError:
                pass
        for i, value in enumerate(obj.__defaults__ or ()):
            children.append((f"default argument {i} of {obj.__qualname__}()", value))
    elif isinstance(obj, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in list(obj.items())[:1000]]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(list(obj)[:1000])]
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        children = [(f"{path}.{k}", v) for k, v in list(vars(obj).items())[:1000]]
    elif hasattr(obj, "func") and hasattr(obj, "args"):  # functools.partial
        children = [(f"{path}.func", obj.func)] + \
                   [(f"{path}.args[{i}]", v) for i, v in enumerate(obj.args)]
    for child_path, child in children:
        err = _try_dill(child)
        if err is not None:
            deeper = _find_culprit(child, child_path, depth + 1, seen)
            return deeper or (child_path, child, err)
    return None


def _explain_dumps_failure(obj, what: str, exc: Exception) -> str:
    found = _find_culprit(obj, what)
    if found is None:
        part = f"{what} ({_short(obj)})"
        err = exc
    else:
        path, culprit, err = found
        part = f"{path} = {_short(culprit)} (type {type(culprit).__module__}.{type(culprit).__qualname__})"
    return (
        f"cannot serialise {what} to send it to the workers: {part} cannot be pickled "
        f"({type(err).__name__}: {err}). Fix: create such objects inside the function (or in a "
        f"Pool initializer) instead of capturing them, or pass plain data (numbers, arrays, "
        f"paths) and open/build the object in the task."
    )


# ----------------------------------------------------------------------------------------------
# Cheap change detection for a warm pool

class _Opaque:
    """Marker in a fingerprint: the object is compared by identity."""


def _ident(i):
    return (_Opaque, i)


class _FingerprintPickler(pickle.Pickler):
    """Pickles a function's *shape*: code by identity, globals/closure/defaults by value.

    Arrays are out-of-band: small ones are compared by content, big ones by identity (so a big
    captured array is never re-read). Classes, code objects and other unpicklables go by identity.
    """

    SMALL = 4096

    def __init__(self, file):
        super().__init__(file, protocol=_PROTOCOL, buffer_callback=self._buffer)
        self.idents: list = []
        self.small: list = []
        self._expanded: set = set()

    def _buffer(self, pb):
        raw = pb.raw()
        if raw.nbytes <= self.SMALL:
            self.small.append(bytes(raw))
        else:
            self.idents.append(raw.obj)
        return False

    def _by_identity(self, obj):
        self.idents.append(obj)
        return (_ident, (len(self.idents) - 1,))

    def reducer_override(self, obj):
        if obj is _ident or obj is tuple:  # the callables of our own reduce values
            return NotImplemented
        t = type(obj)
        if t is types.FunctionType:
            if id(obj) in self._expanded or _importable(obj):
                return self._by_identity(obj)
            self._expanded.add(id(obj))
            cells = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:
                    cells.append(None)
            self.idents.append(obj.__code__)
            return (tuple, ((len(self.idents) - 1, obj.__defaults__, obj.__kwdefaults__,
                             tuple(cells), tuple(_referenced_globals(obj)),
                             obj.__dict__ or None),))
        if t is types.ModuleType:
            return (_ident, (obj.__name__,))
        if isinstance(obj, type) or t in (types.CodeType, types.BuiltinFunctionType):
            return self._by_identity(obj)
        return NotImplemented


def _importable(func) -> bool:
    """Would dill pickle ``func`` by reference (so only its identity matters)?"""
    module = getattr(func, "__module__", None)
    if module in (None, "__main__"):
        return False
    target = sys.modules.get(module)
    for part in func.__qualname__.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is func


def fingerprint(obj):
    """A value that changes when ``obj`` (a function or callable) would pickle differently.

    Returns None when it cannot be computed (then the object is re-serialised every time).
    Equal fingerprints: compare with ``same_fingerprint``. Not a hash to keep across processes.
    """
    out = io.BytesIO()
    p = _FingerprintPickler(out)
    try:
        p.dump(obj)
    except Exception:
        return None
    refs = []
    for x in p.idents:
        try:
            refs.append(weakref.ref(x))
        except TypeError:
            refs.append(x)  # kept alive by us, so its id cannot be reused while cached
    return (out.getvalue(), tuple(p.small), tuple(refs))


def same_fingerprint(a, b) -> bool:
    if a is None or b is None or a[0] != b[0] or a[1] != b[1] or len(a[2]) != len(b[2]):
        return False
    for x, y in zip(a[2], b[2]):
        x = x() if isinstance(x, weakref.ref) else x
        y = y() if isinstance(y, weakref.ref) else y
        if x is None or x is not y:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Read-only common data

_RO_MESSAGE = ("mpimap: common data is read-only inside tasks (every rank shares one copy); "
               "copy it first if a task needs to change it, e.g. dict(common) or arr.copy()")


def _readonly(*_args, **_kwargs):
    raise TypeError(_RO_MESSAGE)


class ReadOnlyDict(dict):
    """A dict whose mutators raise TypeError; pickles and copies as a plain dict."""

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly
    __ior__ = _readonly

    def __reduce__(self):
        return (dict, (dict(self),))


class ReadOnlyList(list):
    """A list whose mutators raise TypeError; pickles and copies as a plain list."""

    __setitem__ = __delitem__ = append = extend = insert = pop = remove = _readonly
    clear = sort = reverse = __iadd__ = __imul__ = _readonly

    def __reduce__(self):
        return (list, (list(self),))


class ReadOnlySet(set):
    """A set whose mutators raise TypeError; pickles and copies as a plain set."""

    add = discard = remove = pop = clear = update = _readonly
    difference_update = intersection_update = symmetric_difference_update = _readonly
    __ior__ = __iand__ = __isub__ = __ixor__ = _readonly

    def __reduce__(self):
        return (set, (set(self),))


def freeze(obj, _depth=0):
    """Make common data read-only: arrays (at any depth) and dicts/lists/sets inside containers.

    Arrays rebuilt from read-only receive buffers are read-only already; this also covers arrays
    that were pickled in-band and the containers themselves.
    """
    if _depth > 50:
        return obj
    nd = _ndarray_type()
    t = type(obj)
    if nd is not None and isinstance(obj, nd):
        if obj.flags.writeable:
            obj = obj.view()
            obj.flags.writeable = False
        return obj
    if t is dict or t is ReadOnlyDict:
        return ReadOnlyDict({k: freeze(v, _depth + 1) for k, v in obj.items()})
    if t is list or t is ReadOnlyList:
        return ReadOnlyList([freeze(v, _depth + 1) for v in obj])
    if t is set or t is ReadOnlySet:
        return ReadOnlySet(obj)
    if t is tuple:
        return tuple(freeze(v, _depth + 1) for v in obj)
    if isinstance(obj, tuple) and hasattr(t, "_make"):  # namedtuple
        return t._make(freeze(v, _depth + 1) for v in obj)
    return obj
