"""PostgreSQL URLs: checked, and shown without their secrets.

Standard library only, so anything may import it cheaply.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

_MUST_ENCODE = "@/?#[]"
ENCODING_HINT = (
    "percent-encode it: %40 for @, %3A for :, %2F for /, %3F for ?, %23 for # (for example "
    "python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=\"\"))' "
    "PASSWORD)"
)


def _check_userinfo(url: str) -> None:
    """A raw reserved character in the user name or password makes the URL mean something
    else (another host, a path), so it is refused before any driver guesses."""
    rest = url.split("://", 1)[1] if "://" in url else url
    at = rest.rfind("@")
    if at < 0:
        return
    userinfo = rest[:at]
    _, colon, password = userinfo.partition(":")
    if any(c in userinfo for c in _MUST_ENCODE) or (colon and ":" in password):
        raise ValueError(
            "the user name or password holds a character that must be percent-encoded in a "
            f"URL (@ : / ? #): {ENCODING_HINT}"
        )


def check_postgres_url(url: str) -> None:
    """Raise ValueError (without quoting the URL) when `url` is not a usable PostgreSQL URL."""
    _check_userinfo(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(
            "not a valid URL (expected postgresql://user:password@host:port/db)"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must start with postgresql:// or postgres://")
    if not parts.hostname:
        raise ValueError("has no host name")
    if port is not None and not 0 < port < 65536:
        raise ValueError("port out of range")


def _is_secret_parameter(name: str) -> bool:
    return "password" in name.lower()


def url_secrets(url: str) -> list[str]:
    """The secrets inside `url`, as written and unescaped: the password in its user part and
    the value of any `password`-like query parameter (libpq accepts `?password=...`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    userinfo = parts.netloc.rpartition("@")[0]
    _, colon, password = userinfo.partition(":")
    if colon and password:
        found += [password, unquote(password)]
    found += [value for name, value in parse_qsl(parts.query) if _is_secret_parameter(name)]
    return [secret for secret in found if secret]


def redact_url(url: str) -> str:
    """The URL with every secret replaced by `***`; safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}:***@{hostport}" if colon else parts.netloc
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_is_secret_parameter(name) for name, _ in pairs):
        query = "&".join(
            f"{name}=***" if _is_secret_parameter(name) else f"{name}={value}"
            for name, value in pairs
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
