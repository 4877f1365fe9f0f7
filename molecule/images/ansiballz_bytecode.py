"""Test containers only: reuse the bytecode of what Ansible's modules import from their AnsiballZ zip.

Every task sends its module with ansible.module_utils in a zip that the container's Python unpacks into a new
temporary directory and imports from. zipimport never writes bytecode, so the same sources were compiled
again for every task: measured here, 60 `stat` tasks against one container took 20 CPU seconds, 17 with
this cache. The cache is keyed by the file's path inside the zip and a hash of its source, so a changed
module or a new Ansible compiles afresh; only the compiled code is reused, then given the file name of the
zip that this run imports from, so tracebacks name the real file. Loaded from a .pth file that the image
build installs (molecule/images/build); hosts of the product never have it.
"""

from __future__ import annotations

import zipimport

# Runs at every Python start in the container: the rest is imported only when a zip's module is compiled.
CACHE_ROOT = "/var/cache/pli-ansiballz-bytecode"
_compile_source = zipimport._compile_source  # type: ignore[attr-defined]


def _named(code, filename: str):  # code: types.CodeType, imported only when needed
    import types

    constants = tuple(_named(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=constants)


def _cached_compile_source(pathname: str, source: bytes):
    import hashlib
    import marshal
    import os
    import sys
    from pathlib import Path

    if ".zip" + os.sep not in pathname:
        return _compile_source(pathname, source)
    inside_zip = pathname.split(".zip" + os.sep, 1)[1]
    key = hashlib.sha256(inside_zip.encode() + b"\0" + source).hexdigest()
    cache = Path(CACHE_ROOT) / (sys.implementation.cache_tag or "python")
    cached = cache / key
    try:
        with cached.open("rb") as stored:
            # Written only by this function, in a directory only root may write to.
            return _named(marshal.load(stored), pathname)  # noqa: S302
    except (OSError, EOFError, ValueError, TypeError):
        pass
    code = _compile_source(pathname, source)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"{key}.{os.getpid()}"
        with partial.open("wb") as stored:
            marshal.dump(code, stored)
        partial.replace(cached)
    except OSError:
        pass  # a user who may not write the cache (become_user) just compiles
    return code


zipimport._compile_source = _cached_compile_source  # type: ignore[attr-defined]
