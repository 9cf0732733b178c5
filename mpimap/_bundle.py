"""Bundles: a content-addressed set of data files and modules, built on rank 0, staged per node.

    files=["data/", "*.csv"]  ──resolve (relative to rank 0's cwd; refuse /abs and ../)──┐
    modules=["mylib"] + detected local imports (_modules) ──────────────────────────────┤
                                                                                         ▼
      entries (bundle path, source, size, mode)  ── size+mtime+inode seen before? ── sha256 known
                                                     no: read the file once to hash it
                                                                                         │
      manifest = entries + sha256 ──▶ content id = sha256(canonical JSON of the content part)
                                                                                         │
      already published on rank 0's node? ── yes: nothing is read or copied
                                          ── no: pieces of <= MPIMAP_BUNDLE_PIECE bytes of the
                                             source files, in manifest order, go to the nodes
                                             that miss the id AND into rank 0's own Receiver,
                                             so every node writes its copy at the same time
                                                                                         │
      Receiver (each stager, and rank 0): validate the manifest first (no /abs, no .., links
      stay inside, no device files), write + sha256 each file as it arrives (created read-only,
      mtime = the publish stamp), compare with the manifest, publish with one rename; a
      mismatch on a node -> that node re-receives (from rank 0's published, immutable copy);
      on rank 0 -> a source file changed while it was bundled: an error

Format, and why not tar.  A published bundle is a directory: ``manifest.json``, ``files/<the
files= tree>`` and ``modules/<shipped modules>``.  On the wire it is the manifest plus the files'
bytes back to back.  A tar stream would repeat in its headers what the manifest says, and its
extraction would still have to be checked entry by entry; here extraction checks every entry
itself, with the rules of tarfile's "data" filter, and every file's sha256 as it is written.

"Packed once".  The expensive part of a bundle is reading and hashing its files.  Rank 0 keeps a
(path, size, mtime, inode) -> sha256 index in memory and in the cache (``hashes.json``), so a
file set used by many maps -- or by the next run -- is hashed once; a map whose id is already
published (and known on every node) reads no file at all.  As with make and rsync, a file
rewritten with the same size and mtime is not noticed.

The content id hashes the format, every entry (path, type, size, mode, sha256, link target) and
the names of the shipped modules.  Informational fields (python and mpimap versions, when and
where it was published) are not part of it: the same files give the same id on every machine.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import platform
import stat
import time
from dataclasses import dataclass, field

from . import _cache
from ._errors import BundleError

__all__ = ["Bundle", "Builder", "Receiver", "check_manifest", "load_manifest", "resolve_files",
           "verify_published"]

FORMAT = 1
_HASH_CHUNK = 1 << 20


@dataclass
class Entry:
    path: str  # inside the bundle: "files/data/a.csv", "modules/mylib/__init__.py"
    type: str  # "file", "dir" or "link"
    source: str = ""  # absolute path on rank 0 (not in the manifest)
    size: int = 0
    mode: int = 0o644
    sha256: str = ""
    target: str = ""  # links: relative target
    key: tuple = ()  # (size, mtime_ns, inode, dev) when read, for the hash index

    def record(self) -> dict:
        r = {"path": self.path, "type": self.type}
        if self.type == "file":
            r.update(size=self.size, mode=f"{self.mode:04o}", sha256=self.sha256)
        elif self.type == "link":
            r["target"] = self.target
        return r


@dataclass
class Bundle:
    """What the engine hands around: the id, the manifest, and where the bytes are on rank 0 --
    its published copy (``path``), or until then the source files (``sources``)."""

    id: str
    path: str | None
    manifest: dict
    modules_key: str = ""  # hash of the module entries only: "the workers' modules changed"
    has_files: bool = False
    top: list = field(default_factory=list)  # top-level names under files/
    sources: dict = field(default_factory=dict)  # bundle path -> file on rank 0 (unpublished)


# ----------------------------------------------------------------------------------------------
# files= on rank 0

_GLOB_CHARS = set("*?[")


def _as_path(item, what) -> str:
    if isinstance(item, (str, os.PathLike)):
        p = os.fspath(item)
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not p:
            raise BundleError(f"{what}: an empty path")
        return p
    raise TypeError(f"{what}: expected a path (str or pathlib.Path), got "
                    f"{type(item).__name__} {item!r}")


def _inside(rel: str) -> bool:
    return rel != ".." and not rel.startswith("../") and not os.path.isabs(rel)


def _refuse_outside(given: str, cwd: str) -> None:
    raise BundleError(
        f"files=: {given!r} is {'an absolute path' if os.path.isabs(given) else 'outside the current directory'}"
        f" ({cwd}). Inside a task, files= paths open by the same relative path as on rank 0, so "
        f"they must lie under rank 0's current directory. Fix: pass it relative to {cwd}, or "
        f"make a link inside it and pass the link (`ln -s {os.path.abspath(os.path.join(cwd, given))} "
        f"{os.path.basename(given.rstrip('/')) or 'data'}` then files=[{os.path.basename(given.rstrip('/')) or 'data'!r}]), "
        f"or start the script from a directory that contains the file.")


def resolve_files(spec, cwd: str, skip: tuple = ()) -> list[Entry]:
    """files= -> entries under "files/", checked: every path exists, is readable and lies under
    ``cwd``. Directories are taken whole; patterns (``*``, ``?``, ``[``, ``**``) are expanded
    relative to ``cwd``. ``skip``: absolute directories never to include (mpimap's own)."""
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"files= must be a list of paths, not {type(spec).__name__}") from None
    found: dict = {}  # relative path -> (absolute source, is a link), or None: a directory
    for item in items:
        given = _as_path(item, "files=")
        rel = os.path.normpath(given)
        if os.path.isabs(given) or not _inside(rel):
            _refuse_outside(given, cwd)
        full = os.path.join(cwd, rel)
        if not os.path.lexists(full) and _GLOB_CHARS & set(given):
            matches = sorted(glob.glob(given, root_dir=cwd, recursive=True))
            if not matches:
                raise BundleError(f"files=: the pattern {given!r} matches nothing in {cwd}")
            for m in matches:
                _add_path(os.path.normpath(m), cwd, found, skip, given)
            continue
        try:
            os.lstat(full)
        except PermissionError:
            raise BundleError(f"files=: {given!r} cannot be read (permission denied on "
                              f"{full} or a directory above it)") from None
        except OSError:
            raise BundleError(f"files=: {given!r} does not exist (looked for {full}). Paths in "
                              f"files= are relative to rank 0's current directory.") from None
        _add_path(rel, cwd, found, skip, given)
    return _entries_from(found, cwd)


def _add_path(rel, cwd, found, skip, given):
    full = os.path.join(cwd, rel) if rel != "." else cwd
    if not _inside(rel):
        _refuse_outside(rel, cwd)
    if os.path.islink(full) and not os.path.exists(full):
        raise BundleError(f"files=: {rel!r} is a link to {os.readlink(full)!r}, which does not "
                          f"exist")
    if os.path.isdir(full):
        _walk(full, rel, found, skip, set())
    else:
        found[rel] = (full, os.path.islink(full))


def _walk(full, rel, found, skip, seen):
    """A directory, recursively, following links to directories once each (no cycles)."""
    real = os.path.realpath(full)  # once per directory, not per file: it costs a few lstats
    if real in seen or any(real == s or real.startswith(s + os.sep) for s in skip):
        return
    seen.add(real)
    if rel != ".":
        found.setdefault(rel, None)  # a directory
    try:
        with os.scandir(full) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise BundleError(f"files=: the directory {rel!r} cannot be read "
                          f"({(exc.strerror or str(exc)).replace('Permission', 'permission')})"
                          ) from None
    for e in children:
        r = e.name if rel == "." else os.path.join(rel, e.name)
        if e.is_symlink():
            if not os.path.exists(e.path):
                raise BundleError(f"files=: {r!r} is a link to {os.readlink(e.path)!r}, which "
                                  f"does not exist")
            if e.is_dir():
                _walk(e.path, r, found, skip, seen)
            else:
                found[r] = (e.path, True)
        elif e.is_dir(follow_symlinks=False):
            _walk(e.path, r, found, skip, seen)
        else:
            found[r] = (e.path, False)


def _entries_from(found: dict, cwd: str) -> list[Entry]:
    out = []
    real_cwd = None
    for rel in sorted(found):
        v = found[rel]
        path = "files/" + rel.replace(os.sep, "/")
        if v is None:
            out.append(Entry(path, "dir"))
            continue
        src, is_link = v
        try:
            st = os.stat(src)
        except OSError as exc:
            raise BundleError(f"files=: cannot read {rel!r}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"files=: {rel!r} is not a regular file or directory (a device, "
                              f"pipe or socket cannot be bundled)")
        if not os.access(src, os.R_OK):
            raise BundleError(f"files=: {rel!r} cannot be read (permission denied)")
        if is_link:
            # A link to another bundled file stays a link (one copy of the bytes); any other
            # link is followed and its content shipped under the link's name.
            real_cwd = real_cwd or os.path.realpath(cwd)
            target = os.path.realpath(src)
            other = os.path.relpath(target, real_cwd)
            hit = found.get(other)
            if hit and not hit[1] and other != rel and os.path.realpath(hit[0]) == target:
                out.append(Entry(path, "link", target=os.path.relpath(
                    other, os.path.dirname(rel) or ".").replace(os.sep, "/")))
                continue
        out.append(Entry(path, "file", source=src, size=st.st_size,
                         mode=stat.S_IMODE(st.st_mode) & 0o777,
                         key=(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)))
    return out


def module_entries(found: list) -> list[Entry]:
    """Entries under "modules/" for [(name, kind, path)] from _modules.resolve()."""
    out = []
    for name, kind, path in found:
        if kind == "module":
            st = os.stat(path)
            out.append(Entry(f"modules/{os.path.basename(path)}", "file", source=path, size=st.st_size,
                             mode=stat.S_IMODE(st.st_mode) & 0o777,
                             key=(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)))
            continue
        out.append(Entry(f"modules/{name}", "dir"))
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, path)
            if rel_dir != ".":
                out.append(Entry(f"modules/{name}/{rel_dir.replace(os.sep, '/')}", "dir"))
            for fname in sorted(filenames):
                if fname.endswith((".pyc", ".pyo")):
                    continue
                src = os.path.join(dirpath, fname)
                st = os.stat(src)
                if not stat.S_ISREG(st.st_mode):
                    continue
                rel = os.path.relpath(src, path).replace(os.sep, "/")
                out.append(Entry(f"modules/{name}/{rel}", "file", source=src, size=st.st_size,
                                 mode=stat.S_IMODE(st.st_mode) & 0o777,
                                 key=(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)))
    return out


# ----------------------------------------------------------------------------------------------
# Manifest and content id

def content_id(entries: list, modules: list) -> str:
    body = {"format": FORMAT, "entries": [e.record() for e in entries],
            "modules": sorted([m["name"], bool(m.get("detected"))] for m in modules)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def modules_key(entries: list) -> str:
    mods = [e.record() for e in entries if e.path.startswith("modules/")]
    if not mods:
        return ""
    return hashlib.sha256(json.dumps(mods, sort_keys=True).encode()).hexdigest()[:32]


def make_manifest(bid, entries, spec, modules, detected) -> dict:
    from . import __version__

    files = [e for e in entries if e.type == "file"]
    return {
        "format": FORMAT,
        "id": bid,
        "entries": [e.record() for e in entries],
        "files": list(spec),
        "modules": modules,
        "detected_imports": detected,
        "file_count": len(files),
        "total_bytes": sum(e.size for e in files),
        "python": platform.python_version(),
        "mpimap": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "created_on": _cache.node_name(),
    }


def check_manifest(man) -> list[dict]:
    """The entries of a manifest that came from elsewhere, refusing anything unsafe.

    Refused: absolute paths, ``..`` or empty components, paths outside files/ and modules/,
    duplicates, entries below a link, links whose target leaves the bundle, and any type but
    file, dir and link (device files, fifos, sockets).
    """
    if not isinstance(man, dict) or man.get("format") != FORMAT or \
            not isinstance(man.get("entries"), list):
        raise BundleError("the bundle manifest is not one this mpimap understands (format "
                          f"{man.get('format') if isinstance(man, dict) else '?'})")
    seen = set()
    links = set()
    out = []
    for e in man["entries"]:
        path = e.get("path") if isinstance(e, dict) else None
        kind = e.get("type") if isinstance(e, dict) else None
        if not isinstance(path, str) or not path or "\0" in path:
            raise BundleError(f"unsafe bundle entry {e!r}: no usable path")
        if path.startswith("/") or os.path.isabs(path):
            raise BundleError(f"unsafe bundle entry {path!r}: an absolute path")
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise BundleError(f"unsafe bundle entry {path!r}: '..', '.' or empty components")
        if parts[0] not in ("files", "modules") or len(parts) < 2:
            raise BundleError(f"unsafe bundle entry {path!r}: outside files/ and modules/")
        if kind not in ("file", "dir", "link"):
            raise BundleError(f"unsafe bundle entry {path!r}: type {kind!r} (only regular files, "
                              f"directories and links inside the bundle are extracted; device "
                              f"files, fifos and sockets never are)")
        if path in seen:
            raise BundleError(f"unsafe bundle entry {path!r}: listed twice")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise BundleError(f"unsafe bundle entry {path!r}: it lies below a link")
        seen.add(path)
        if kind == "link":
            target = e.get("target")
            if not isinstance(target, str) or not target or target.startswith("/") or \
                    "\0" in target:
                raise BundleError(f"unsafe bundle entry {path!r}: link target {target!r} is "
                                  f"absolute or empty")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            top = parts[0]
            if resolved.startswith("..") or not (resolved == top or resolved.startswith(top + "/")):
                raise BundleError(f"unsafe bundle entry {path!r}: the link points outside the "
                                  f"bundle ({target!r})")
            links.add(path)
        if kind == "file":
            if not isinstance(e.get("size"), int) or e["size"] < 0 or \
                    not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
                raise BundleError(f"bad bundle entry {path!r}: size or sha256 missing")
            mode = e.get("mode", "0644")
            if not isinstance(mode, str) or not 3 <= len(mode) <= 4 or \
                    any(c not in "01234567" for c in mode):
                raise BundleError(f"bad bundle entry {path!r}: mode {mode!r}")
        out.append(e)
    return out


def load_manifest(path: str) -> dict:
    """The manifest of a published bundle directory (or of a manifest.json path)."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    with open(path) as fh:
        return json.load(fh)


def verify_published(path: str, bid: str) -> str | None:
    """Cheap check of a published bundle before it is trusted: None if fine, else why not.

    Every file must still have its size, and the mtime the publisher gave it. A file written
    after publishing (a task running as root ignores the read-only modes; a C library opening a
    bundled file for update) changes its mtime: the node then re-receives the bundle.
    """
    try:
        man = load_manifest(path)
    except (OSError, ValueError) as exc:
        return f"its manifest cannot be read ({exc})"
    if man.get("id") != bid:
        return "its manifest names another id"
    stamp = man.get("published")
    for e in man.get("entries", ()):
        p = os.path.join(path, *e["path"].split("/"))
        try:
            st = os.lstat(p)
        except OSError:
            return f"{e['path']} is missing"
        if e["type"] == "file":
            if not stat.S_ISREG(st.st_mode) or st.st_size != e["size"] or \
                    (stamp is not None and st.st_mtime_ns != stamp):
                return f"{e['path']} was changed after it was published"
    return None


def _ro_mode(mode: int) -> int:
    return 0o555 if mode & 0o100 else 0o444


def _create(dest: str, mode: int) -> int:
    """A new file, read-only from birth (the descriptor is still writable): no chmod pass."""
    return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _ro_mode(mode))


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _seal_dirs(top: str, entries: list) -> None:
    """Directories read-only (files already are), except ``top`` itself (see _cache.publish)."""
    dirs = {"files", "modules"}
    for e in entries:
        parts = e["path"].split("/")
        for i in range(1, len(parts) + (e["type"] == "dir")):
            dirs.add("/".join(parts[:i]))
    for d in sorted(dirs, reverse=True):
        p = os.path.join(top, *d.split("/"))
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o555)


def _enospc(exc: OSError, where: str, what: str) -> BundleError:
    return BundleError(f"no space left while {what} in {where} ({exc.strerror}). Free space "
                       f"with `mpimap cache purge --older-than 7d` (or --all), or set "
                       f"MPIMAP_CACHE_DIR to a node-local directory with more room.")


# ----------------------------------------------------------------------------------------------
# Rank 0: build and publish locally

class HashIndex:
    """(path, size, mtime_ns, inode, device) -> sha256, in memory and in the cache's hashes.json."""

    LIMIT = 200_000

    def __init__(self, root: str):
        self.path = os.path.join(root, "hashes.json")
        self.data: dict = {}
        self.dirty = False
        try:
            with open(self.path) as fh:
                raw = json.load(fh)
            if isinstance(raw, dict) and raw.get("format") == 1:
                self.data = {k: tuple(v) for k, v in raw["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            self.data = {}

    def get(self, src, key):
        v = self.data.get(src)
        return v[4] if v is not None and tuple(v[:4]) == tuple(key) else None

    def put(self, src, key, sha):
        self.data[src] = (*key, sha)
        self.dirty = True

    def save(self):
        if not self.dirty:
            return
        if len(self.data) > self.LIMIT:
            self.data = dict(list(self.data.items())[-self.LIMIT // 2:])
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump({"format": 1, "entries": self.data}, fh)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


class Builder:
    """Rank 0's bundle maker: resolve, hash (fast path), publish on rank 0's own node.

    ``build`` hashes what the index does not know (one read of each such file) and returns the
    bundle, published on rank 0's node if it already is. Otherwise rank 0 publishes it while it
    sends it (``local_receiver`` / ``finish_local``, driven by _stage): the same pieces go to
    the nodes that miss it and into rank 0's own staging directory, so the nodes write their
    copies at the same time as rank 0 writes its own.
    """

    def __init__(self, root: str | None = None):
        self.root = root or _cache.cache_root()
        self.index = HashIndex(self.root)
        self.verified: dict[str, str] = {}  # id -> path checked in this process
        self.locks: dict[str, int] = {}  # id -> fd: rank 0 sends from it, purge must not remove
        self.memo: dict = {}  # entries' stat signature -> Bundle

    def build(self, entries: list, spec: list, modules: list, detected: list,
              publish: bool = False) -> Bundle:
        # The same paths with the same (size, mtime, inode) as a map before: the same bundle,
        # without even hashing the manifest again (a file set used by many maps).
        sig = (tuple((e.path, e.type, e.key, e.target) for e in entries),
               json.dumps(modules, sort_keys=True))
        bundle = self.memo.get(sig)
        if bundle is None or self._published(bundle.id) != bundle.path:
            bundle = self._build(entries, spec, modules, detected)
            self.memo[sig] = bundle
            while len(self.memo) > 32:
                self.memo.pop(next(iter(self.memo)))
        elif bundle.path is not None:
            _cache.touch(self.root, bundle.id)
        if publish and bundle.path is None:
            self.publish(bundle)
        return bundle

    def _build(self, entries, spec, modules, detected) -> Bundle:
        for e in entries:
            if e.type == "file":
                e.sha256 = self.index.get(e.source, e.key)
                if not e.sha256:
                    e.sha256, e.size = _hash_file(e.source, e.path)
                    if _stat_key(e.source) == e.key:  # unchanged while we read it
                        self.index.put(e.source, e.key, e.sha256)
        self.index.save()
        bid = content_id(entries, modules)
        path = self._published(bid)
        top = sorted({e.path.split("/")[1] for e in entries if e.path.startswith("files/")})
        if path is not None:
            self._hold(bid, path)
            return Bundle(bid, path, load_manifest(path), modules_key(entries), bool(top), top)
        return Bundle(bid, None, make_manifest(bid, entries, spec, modules, detected),
                      modules_key(entries), bool(top), top,
                      {e.path: e.source for e in entries if e.type == "file"})

    def _published(self, bid):
        if bid in self.verified:
            return self.verified[bid]
        path = _cache.bundle_dir(self.root, bid)
        if os.path.isdir(path):
            if verify_published(path, bid) is None:
                self.verified[bid] = path
                return path
            fd = self.locks.pop(bid, None)
            if fd is not None:
                os.close(fd)
            _cache.discard(self.root, bid)  # damaged: build it again
        return None

    def _hold(self, bid, path):
        _cache.touch(self.root, bid)
        if bid not in self.locks:
            fd = _cache.lock_shared(path)
            if fd is not None:
                self.locks[bid] = fd

    def local_receiver(self, bundle: Bundle) -> "Receiver":
        return Receiver(self.root, bundle.id, bundle.manifest,
                        {"rank": 0, "node": _cache.node_name(), "pid": os.getpid(),
                         "how": "built from the source files"}, where="rank 0's node")

    def finish_local(self, bundle: Bundle, rec: "Receiver") -> str:
        path, bad, err = rec.finish()
        if err is not None:
            raise err
        if bad:
            for p in bad:  # the index must not vouch for these any more
                self.index.data.pop(bundle.sources.get(p, ""), None)
            self.index.dirty = True
            self.index.save()
            raise BundleError(
                f"files=: {_shown(bad[0])}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}"
                f" changed while mpimap was bundling it (between hashing and copying). Do not "
                f"write to files= inputs while a map starts; run the map again.")
        bundle.path = path
        bundle.sources = {}
        self.verified[bundle.id] = path
        self._hold(bundle.id, path)
        return path

    def publish(self, bundle: Bundle, size: int = 64 << 20) -> str:
        """Publish on rank 0's node without sending anywhere."""
        rec = self.local_receiver(bundle)
        for piece in pieces(bundle, size, busy=set):
            rec.feed(piece)
        return self.finish_local(bundle, rec)


def _shown(path: str) -> str:
    return path[6:] if path.startswith("files/") else path


def _hash_file(src, name) -> tuple[str, int]:
    """One read of a source file: (sha256, size)."""
    h = hashlib.sha256()
    n = 0
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"files=: cannot read {_shown(name)}: {exc.strerror or exc}") from None
    try:
        while True:
            block = os.read(fd, _HASH_CHUNK)
            if not block:
                break
            h.update(block)
            n += len(block)
    finally:
        os.close(fd)
    return h.hexdigest(), n


def _stat_key(src):
    try:
        st = os.stat(src)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


# ----------------------------------------------------------------------------------------------
# Sending: the files' bytes in manifest order, in pieces

def pieces(bundle: Bundle, size: int, busy=None):
    """Yield buffers of at most ``size`` bytes: every file's bytes, in manifest order.

    Read from rank 0's published copy, or -- before it exists -- from the source files (which
    rank 0 then publishes from the same pieces). Copies, not mmaps: a source file truncated
    under an mmap would kill rank 0 with SIGBUS; a changed file instead fails its checksum.
    Small files share a piece; the caller bounds how many pieces are in flight.

    ``busy()``: ids of the buffers still referenced by unfinished sends; the others are reused
    (touching fresh memory costs page faults -- seconds per GiB on some machines). Without it
    no buffer is reused.
    """
    files = [e for e in bundle.manifest["entries"] if e["type"] == "file" and e["size"] > 0]
    spent: list = []

    def fresh():
        if busy is not None:
            held = busy()
            for i, old in enumerate(spent):
                if id(old) not in held:
                    return spent.pop(i)
        return bytearray(size)

    buf, fill = fresh(), 0
    for e in files:
        if bundle.path is not None:
            src = os.path.join(bundle.path, *e["path"].split("/"))
        else:
            src = bundle.sources[e["path"]]
        n, off = e["size"], 0
        try:
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BundleError(f"cannot read {_shown(e['path'])} to send it: "
                              f"{exc.strerror or exc}") from None
        try:
            while off < n:
                take = min(size - fill, n - off)
                got = os.preadv(fd, [memoryview(buf)[fill:fill + take]], off)
                if got == 0:
                    raise BundleError(f"files=: {_shown(e['path'])} became shorter while it was "
                                      f"being sent (it changed on disk); run the map again")
                fill += got
                off += got
                if fill == size:
                    yield memoryview(buf)
                    spent.append(buf)
                    buf, fill = fresh(), 0
        finally:
            os.close(fd)
    if fill:
        yield memoryview(buf)[:fill]


class Receiver:
    """A stager's side of one transfer: write pieces into a staging directory, verify, publish."""

    def __init__(self, root: str, bid: str, manifest: dict, origin: dict, where: str = ""):
        self.root = root
        self.where = where or f"node {_cache.node_name()}"
        self.bid = bid
        self.manifest = dict(manifest)
        self.error: BundleError | None = None
        self.bad: list[str] = []
        self.received = 0
        self.staging = None
        self.stamp = time.time_ns()
        try:
            self.entries = check_manifest(manifest)
            if manifest.get("id") != bid:
                raise BundleError("the manifest does not match the bundle id")
            self.staging = _cache.new_staging(root, bid)
            links = []
            for e in self.entries:
                dest = os.path.join(self.staging, *e["path"].split("/"))
                if e["type"] == "dir":
                    os.makedirs(dest, exist_ok=True)
                elif e["type"] == "link":
                    links.append((e["target"], dest))
                else:
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
            self.links = links
            self.origin = origin
            self.files = [e for e in self.entries if e["type"] == "file"]
            self.cur = -1
            self.fh = None
            self.hash = None
            self.left = 0
            self._next_file()
        except BundleError as exc:
            self.error = exc
            self._cleanup()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.error = _enospc(exc, self.root, f"receiving bundle {self.bid[:12]} "
                                 f"({_cache.human(self.manifest.get('total_bytes', 0))}) on "
                                 f"{self.where}")
        else:
            self.error = BundleError(f"cannot write bundle {self.bid[:12]} on {self.where} in "
                                     f"{self.root}: {exc}")
        self._cleanup()

    def _cleanup(self):
        if getattr(self, "fh", None) is not None:
            try:
                os.close(self.fh)
            except OSError:
                pass
        self.fh = None
        if self.staging:
            _cache.remove_tree(self.staging)
            self.staging = None

    def _close_file(self):
        if self.fh is not None:
            os.utime(self.fh, ns=(self.stamp, self.stamp))
            os.close(self.fh)
            e = self.files[self.cur]
            if self.hash.hexdigest() != e["sha256"]:
                self.bad.append(e["path"])
            self.fh = None

    def _next_file(self):
        """Open the next file (zero-length files are complete at once)."""
        while True:
            self._close_file()
            self.cur += 1
            if self.cur >= len(self.files):
                return
            e = self.files[self.cur]
            dest = os.path.join(self.staging, *e["path"].split("/"))
            self.fh = _create(dest, int(e.get("mode", "0644"), 8))
            self.hash = hashlib.sha256()
            self.left = e["size"]
            if self.left > 0:
                return

    def abort(self) -> None:
        """The sender gave up half-way: drop the partial copy."""
        if self.error is None:
            self.error = BundleError("the transfer was abandoned by rank 0")
        self._cleanup()

    def feed(self, data) -> None:
        if self.error is not None:
            return
        view = memoryview(data).cast("B")
        self.received += view.nbytes
        try:
            while view.nbytes:
                if self.fh is None:
                    raise BundleError("more bytes arrived than the manifest lists")
                take = min(self.left, view.nbytes)
                part = view[:take]
                _write_all(self.fh, part)
                self.hash.update(part)
                self.left -= take
                view = view[take:]
                if self.left == 0:
                    self._next_file()
        except BundleError as exc:
            self.error = exc
            self._cleanup()
        except OSError as exc:
            self._fail(exc)

    def finish(self) -> tuple[str | None, list, BundleError | None]:
        """(published path or None, files that failed their checksum, error)."""
        if self.error is not None:
            return None, [], self.error
        try:
            if self.fh is not None or self.cur < len(self.files):
                self._close_file()
                missing = [e["path"] for e in self.files[self.cur:]]
                self._cleanup()
                return None, missing, None
            if self.bad:
                self._cleanup()
                return None, self.bad, None
            for target, dest in self.links:
                os.symlink(target, dest)
            man = dict(self.manifest)
            man["published"] = self.stamp
            man["staged_by"] = self.origin
            with open(os.path.join(self.staging, "manifest.json"), "w") as fh:
                json.dump(man, fh, separators=(",", ":"))
            _seal_dirs(self.staging, self.entries)
            path, _ours = _cache.publish(self.staging, self.root, self.bid)
            self.staging = None
            return path, [], None
        except OSError as exc:
            self._fail(exc)
            return None, [], self.error


# ----------------------------------------------------------------------------------------------
# mpimap bundle inspect

def find(target: str, root: str | None = None) -> str:
    """A published bundle directory from a path (bundle directory or its manifest.json) or an
    id / unique id prefix in this node's cache."""
    if os.path.exists(target):
        path = os.path.dirname(os.path.abspath(target)) if os.path.isfile(target) else target
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise BundleError(f"{target} is not a bundle (no manifest.json in {path})")
        return path
    prefix = target.strip().lower()
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise BundleError(f"{target!r} is neither a path nor a bundle id (hex, at least 4 "
                          f"characters)")
    root = root or _cache.cache_root()
    fan = os.path.join(root, "bundles", prefix[:2])
    hits = sorted(n for n in (os.listdir(fan) if os.path.isdir(fan) else ())
                  if n.startswith(prefix) and _cache.ID_RE.match(n))
    if not hits:
        raise BundleError(f"no bundle {prefix} in {root} (node {_cache.node_name()}); "
                          f"`mpimap cache ls` lists what this node holds")
    if len(hits) > 1:
        raise BundleError(f"{prefix} is ambiguous: {', '.join(h[:16] for h in hits)}")
    return os.path.join(fan, hits[0])
