"""The configured roots: resolved to absolute byte paths, nested roots dropped.

A root may be configured as a symlink to a directory (its watch follows links); a root nested
in another root is dropped, since the outer one covers it. A root is never ignored, whatever
its name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host_agent.collectors.filesystem.paths import text, within


@dataclass
class Root:
    path: bytes
    text: str
    name: str  # the project name of paths below it that are in no git repository
    watched: bool = False


def resolve_roots(configured: Iterable[Path], log: Any) -> list[Root]:
    roots: list[Root] = []
    for root in configured:
        path = os.fsencode(os.path.abspath(os.path.expanduser(os.fspath(root))))
        path_text, _ = text(path)
        outer = next((r for r in roots if within(path, r.path)), None)
        if outer is not None:
            log.warning("fs.root_nested", root=path_text, inside=outer.text)
            continue
        for inner in [r for r in roots if within(r.path, path)]:
            log.warning("fs.root_nested", root=inner.text, inside=path_text)
            roots.remove(inner)
        name = text(os.path.basename(path))[0] or path_text
        roots.append(Root(path, path_text, name))
    return roots


def root_of(roots: Iterable[Root], path: bytes) -> Root | None:
    return next((r for r in roots if within(path, r.path)), None)
