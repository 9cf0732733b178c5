"""What a checkpoint's results belong to: digests that are the same in every process.

A checkpoint may only be resumed by the same function over the same inputs. Pickle bytes cannot
say so: a set (or a dict built by iterating one) pickles in hash order, and string hashes are
randomised per process (PYTHONHASHSEED), so the same function or item gives different bytes in a
fresh process. ``_serial.fingerprint`` has the same problem and also compares big objects by
identity; it is a within-process change detector only. Here every value is fed to SHA-256 through a
canonical encoding instead:

    value ──canonical tokens (type tag + length + content)──▶ sha256 ──▶ 16-byte digest

*The same item* means a value equal to the old one, of the same type:

* None, bool, int, float, complex, str, bytes: their exact value (``1`` and ``1.0`` differ;
  every NaN is the same NaN; ``0.0`` and ``-0.0`` differ);
* tuple and list: their elements in order; dict: its (key, value) pairs in any order (as ``==``);
  set and frozenset: their elements in any order;
* numpy arrays: dtype, shape and the bytes in C order (object arrays element by element);
  numpy scalars: dtype and bytes;
* classes and functions of installed packages and the standard library: their module and
  qualified name;
* anything else: its class and what pickle's reduction returns (``copyreg``'s table, else
  ``__reduce_ex__(4)``: the state pickle would save), encoded by these same rules -- a dataclass
  or a plain object is its class and ``__dict__``; an object that cannot be reduced counts by its
  class (and ``__name__``) only.

*The same function* means: the same code, and the same values for everything the code reads --
its defaults, the contents of its closure cells, the module-level globals it names (recursively
through helper functions and classes defined in the script, by value), and its attributes. The
code is the function's source text with comments and whitespace dropped (so a comment or a blank
line does not change the identity, and neither does another Python version, whose bytecode
differs); bytecode (with its constants, canonically) where the source cannot be read. The same
holds for the user's own modules (a mylib.py next to the script: anything outside site-packages
and the standard library); code of installed packages counts by name (the versions of mpimap,
Python, dill and numpy are recorded next to the results instead). A lambda is identified by the
source lines it is written on.

Cost: microseconds for small values; arrays are hashed at about 1.5 GB/s (SHA-NI).
"""

from __future__ import annotations

import copyreg
import hashlib
import inspect
import io
import math
import os
import struct
import sys
import textwrap
import tokenize
import types

__all__ = ["digest", "digest_items", "function_identity"]

DIGEST_SIZE = 16
_MAX_DEPTH = 200
_DOUBLE = struct.Struct("<d")
_LEN = struct.Struct("<Q")
_SKIP_CLASS_ATTRS = frozenset(("__dict__", "__weakref__", "__module__", "__doc__", "__qualname__",
                               "__firstlineno__", "__static_attributes__"))


def _np():
    return sys.modules.get("numpy")


class _Encoder:
    """Feeds canonical tokens of values into one SHA-256."""

    __slots__ = ("h", "path", "code_cache")

    def __init__(self, code_cache=None):
        self.h = hashlib.sha256()
        self.path: dict = {}  # id -> depth, for cycles (a recursive function, a self-referencing list)
        self.code_cache = {} if code_cache is None else code_cache

    def tag(self, t: bytes, payload: bytes = b""):
        self.h.update(t)
        self.h.update(_LEN.pack(len(payload)))
        self.h.update(payload)

    def sub(self, obj) -> bytes:
        """Digest of ``obj`` alone (to sort the members of sets and dicts)."""
        e = _Encoder(self.code_cache)
        e.path = self.path
        e.enc(obj)
        return e.h.digest()

    # -- values ----------------------------------------------------------------------------------

    def enc(self, obj):
        t = type(obj)
        if obj is None:
            return self.tag(b"N")
        if t is bool:
            return self.tag(b"T" if obj else b"F")
        if t is int:
            return self.tag(b"I", obj.to_bytes((obj.bit_length() + 8) // 8 or 1, "little",
                                               signed=True))
        if t is float:
            return self.tag(b"D", b"nan" if math.isnan(obj) else _DOUBLE.pack(obj))
        if t is complex:
            return self.tag(b"C", (b"nan" if math.isnan(obj.real) else _DOUBLE.pack(obj.real)) +
                            (b"nan" if math.isnan(obj.imag) else _DOUBLE.pack(obj.imag)))
        if t is str:
            return self.tag(b"S", obj.encode("utf-8", "surrogatepass"))
        if t is bytes:
            return self.tag(b"B", obj)
        if t is bytearray:
            return self.tag(b"b", bytes(obj))
        np = _np()
        if np is not None:
            if t is np.ndarray:
                return self._array(obj)
            if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
                return self.tag(b"a" + obj.dtype.str.encode(), obj.tobytes())
        key = id(obj)
        if key in self.path:
            return self.tag(b"@", str(len(self.path) - self.path[key]).encode())
        if len(self.path) > _MAX_DEPTH:
            return self.tag(b"deep", _qualified(t).encode())
        self.path[key] = len(self.path)
        try:
            self._container(obj, t)
        finally:
            del self.path[key]

    def _container(self, obj, t):
        if t is tuple or t is list:
            self.tag(b"(" if t is tuple else b"[", _LEN.pack(len(obj)))
            for x in obj:
                self.enc(x)
        elif t is dict:
            pairs = sorted((self.sub(k), self.sub(v)) for k, v in obj.items())
            self.tag(b"{", _LEN.pack(len(pairs)))
            for k, v in pairs:
                self.h.update(k)
                self.h.update(v)
        elif t is set or t is frozenset:
            members = sorted(self.sub(x) for x in obj)
            self.tag(b"<" if t is set else b">", _LEN.pack(len(members)))
            for m in members:
                self.h.update(m)
        elif t is types.FunctionType:
            self._function(obj)
        elif t is types.MethodType:
            self.tag(b"m")
            self.enc(obj.__func__)
            self.enc(obj.__self__)
        elif t is types.CodeType:
            self._code(obj)
        elif t is types.ModuleType:
            self.tag(b"M", obj.__name__.encode())
        elif isinstance(obj, type):
            self._class(obj)
        elif t in (types.BuiltinFunctionType, types.BuiltinMethodType) and \
                _importable(obj):
            self.tag(b"R", _qualified(obj).encode())
        elif isinstance(obj, (staticmethod, classmethod)):
            self.tag(b"sm" if isinstance(obj, staticmethod) else b"cm")
            self.enc(obj.__func__)
        elif isinstance(obj, property):
            self.tag(b"p")
            for part in (obj.fget, obj.fset, obj.fdel):
                self.enc(part)
        else:
            self._reduced(obj, t)

    def _array(self, a):
        np = _np()
        self.tag(b"A" + a.dtype.str.encode(), repr(a.shape).encode())
        if a.dtype.hasobject:
            for x in a.ravel(order="C"):
                self.enc(x)
            return
        if a.dtype.fields is not None:
            self.tag(b"fields", repr(a.dtype.descr).encode())
        c = np.ascontiguousarray(a)
        self.h.update(memoryview(c).cast("B") if c.size else b"")

    def _reduced(self, obj, t):
        """Other objects: their class and the state pickle would save."""
        self.tag(b"O", _qualified(t).encode())  # an item's class counts by name
        try:
            custom = copyreg.dispatch_table.get(t)  # how pickle reduces it (numpy ufuncs...)
            reduced = custom(obj) if custom is not None else obj.__reduce_ex__(4)
        except Exception:
            return self.tag(b"?", str(getattr(obj, "__name__", "")).encode())
        if isinstance(reduced, str):  # a global looked up by name (ufuncs, singletons)
            return self.tag(b"g", reduced.encode())
        parts = list(reduced) + [None] * (6 - len(reduced))
        func, args, state, listitems, dictitems = parts[:5]
        self.enc(func)
        self.enc(args)
        self.enc(state)
        self.enc(None if listitems is None else list(listitems))
        self.enc(None if dictitems is None else dict(dictitems))

    # -- code ------------------------------------------------------------------------------------

    def _class(self, cls):
        """A class the code uses: by name if installed, else its source and what its methods
        read. (Not its __dict__: generated members and pickle's __slotnames__ cache live there.)"""
        if _importable(cls):
            return self.tag(b"R", _qualified(cls).encode())
        self.tag(b"K", cls.__qualname__.encode())
        self.enc(tuple(b for b in cls.__bases__ if b is not object))
        text = _source_tokens(cls)
        if text is not None:
            self.tag(b"src", text.encode("utf-8", "surrogatepass"))
        for name in sorted(vars(cls)):
            value = vars(cls)[name]
            f = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
            if isinstance(f, types.FunctionType):
                if f.__code__.co_filename.startswith("<") and text is not None:
                    continue  # generated (dataclass, namedtuple): follows from the source
                self.tag(b"k", name.encode())
                if text is None:
                    self._code(f.__code__, f)
                self._context(f)
            elif text is None and name not in _SKIP_CLASS_ATTRS and not name.startswith("__"):
                self.tag(b"k", name.encode())
                self.enc(value)

    def _function(self, f):
        if _importable(f):
            return self.tag(b"R", _qualified(f).encode())
        self.tag(b"f", f.__qualname__.encode())
        self._code(f.__code__, f)
        self._context(f)

    def _context(self, f):
        """What a function's code reads: defaults, closure cells, globals, attributes."""
        self.enc(f.__defaults__)
        self.enc(f.__kwdefaults__)
        cells = []
        for cell in f.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:
                cells.append(_EMPTY_CELL)
        self.enc(tuple(cells))
        g = f.__globals__
        builtins = g.get("__builtins__")
        for name in sorted(_global_names(f.__code__)):
            if name in g:
                value = g[name]
            elif builtins is not None and not isinstance(builtins, dict) and \
                    hasattr(builtins, name):
                continue  # a builtin: the same in every process
            else:
                continue
            self.tag(b"G", name.encode())
            self.enc(value)
        if getattr(f, "__dict__", None):
            self.enc(dict(f.__dict__))

    def _code(self, code, func=None):
        text = _source_tokens(func) if func is not None else None
        if text is not None:
            return self.tag(b"src", text.encode("utf-8", "surrogatepass"))
        self.tag(b"co", code.co_name.encode())
        self.tag(b"bc", code.co_code)
        exc = getattr(code, "co_exceptiontable", b"")
        self.tag(b"ex", exc)
        self.tag(b"n", "\0".join(code.co_names).encode())
        self.tag(b"v", "\0".join(code.co_varnames + code.co_freevars + code.co_cellvars).encode())
        self.tag(b"ar", repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                              code.co_flags)).encode())
        for const in code.co_consts:
            self.enc(const)


class _EmptyCell:
    def __reduce__(self):
        return "_EMPTY_CELL"


_EMPTY_CELL = _EmptyCell()


def _global_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None) or obj.__name__}"


def _importable(obj) -> bool:
    """Library code: found again by importing an installed module, so its name identifies it.

    Code of the script and of the user's own modules (a mylib.py next to it, an editable
    install: anything outside site-packages and the standard library) counts by value, so that
    editing it is noticed -- the same line dill draws between by-value and by-reference."""
    module = getattr(obj, "__module__", None)
    if module in (None, "__main__") or module.startswith("__mp_main__"):
        return False
    target = sys.modules.get(module)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if target is None or not qualname or "<locals>" in qualname:
        return False
    if not _installed(target):
        return False
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


_INSTALLED: dict = {}


def _installed(module) -> bool:
    """Is ``module`` built in, in the standard library, in site-packages, or mpimap itself?"""
    name = module.__name__
    known = _INSTALLED.get(name)
    if known is not None:
        return known
    file = getattr(module, "__file__", None)
    if file is None or name.split(".")[0] == "mpimap":
        result = True
    else:
        import sysconfig

        path = os.path.realpath(file)
        roots = {os.path.realpath(p) for key in ("stdlib", "platstdlib")
                 if (p := sysconfig.get_paths().get(key))}
        parts = set(path.split(os.sep))
        result = bool(parts & {"site-packages", "dist-packages"}) or \
            any(path.startswith(r + os.sep) for r in roots)
    _INSTALLED[name] = result
    return result


_SOURCE_CACHE: dict = {}


def _source_tokens(obj) -> str | None:
    """Source of a function or class with comments, blank lines and indentation dropped; None
    when it cannot be read.

    Tokens are joined by one space; an f-string is kept as the exact text it was written as, so
    Python 3.12's f-string tokens give the same text as 3.11's single STRING token.
    """
    code = getattr(obj, "__code__", None)
    key = (code.co_filename, code.co_firstlineno, code.co_name) if code is not None else \
        (id(obj), getattr(obj, "__qualname__", ""))
    cached = _SOURCE_CACHE.get(key)
    if cached is not None and cached[0] is (code if code is not None else obj):
        return cached[1]
    try:
        lines, _start = inspect.getsourcelines(obj)
        source = textwrap.dedent("".join(lines))
        out = []
        skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER)
        fstart = getattr(tokenize, "FSTRING_START", None)
        fend = getattr(tokenize, "FSTRING_END", None)
        src_lines = source.splitlines(keepends=True)
        depth = 0
        begin = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if fstart is not None and tok.type == fstart:
                if depth == 0:
                    begin = tok.start
                depth += 1
                continue
            if depth:
                if tok.type == fend:
                    depth -= 1
                    if depth == 0:
                        out.append(_span(src_lines, begin, tok.end))
                continue
            if tok.type not in skip:
                out.append(tok.string)
        text = " ".join(out)
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndentationError):
        text = None
    _SOURCE_CACHE[key] = (code if code is not None else obj, text)
    return text


def _span(lines, start, end) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]


# ----------------------------------------------------------------------------------------------

def digest(obj) -> bytes:
    """16-byte canonical digest of ``obj`` (see the module docstring for what counts)."""
    e = _Encoder()
    e.enc(obj)
    return e.h.digest()[:DIGEST_SIZE]


def digest_items(items) -> bytes:
    """Concatenated 16-byte digests of a chunk of items (argument tuples for several inputs)."""
    cache: dict = {}
    out = bytearray()
    for item in items:
        e = _Encoder(cache)
        e.enc(item)
        out += e.h.digest()[:DIGEST_SIZE]
    return bytes(out)


def function_identity(func) -> dict:
    """{"digest": hex, "name", "file", "line"} of the mapped function (any callable)."""
    target = func
    while True:
        inner = getattr(target, "__func__", None) or (
            getattr(target, "func", None) if not isinstance(target, types.FunctionType) else None)
        if inner is None or inner is target:
            break
        target = inner
    code = getattr(target, "__code__", None)
    return {
        "digest": digest(func).hex(),
        "name": getattr(func, "__qualname__", None) or type(func).__qualname__,
        "file": getattr(code, "co_filename", None),
        "line": getattr(code, "co_firstlineno", None),
    }
