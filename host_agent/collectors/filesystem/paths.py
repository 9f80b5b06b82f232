"""Paths as the filesystem collector holds them: bytes, as inotify and the kernel give them
(a name need not be valid UTF-8)."""

from __future__ import annotations


def join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory != b"/" else b"/" + name


def prefix(directory: bytes) -> bytes:
    """`directory` with one trailing slash: what every path below it starts with."""
    return directory if directory.endswith(b"/") else directory + b"/"


def within(path: bytes, top: bytes) -> bool:
    """Whether `path` is `top` or lies below it."""
    return path == top or path.startswith(prefix(top))


def text(path: bytes) -> tuple[str, bytes | None]:
    """The text a column gets and, when the bytes are not UTF-8, the raw bytes.

    Names that are not valid UTF-8 get backslash escapes in the text."""
    try:
        return path.decode("utf-8"), None
    except UnicodeDecodeError:
        return path.decode("utf-8", "backslashreplace"), path
