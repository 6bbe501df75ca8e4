"""The shared cluster token, read from a file (a Docker secret in the stack).

Decisions:
- Surrounding whitespace is stripped (``echo token > file`` adds a newline).
- Missing, unreadable, empty, too short (< 16 characters), too long, or containing
  characters that cannot travel in an HTTP header (anything but printable ASCII
  without spaces) is a ``ConfigError`` naming the file.
- A world-READABLE file is accepted: Docker mounts secrets as 0444 on a tmpfs only
  the container sees, so refusing it would refuse the normal deployment.  A
  group- or world-WRITABLE file is refused: anyone who can write it can replace
  the token that admits peers into the control plane.
"""

from __future__ import annotations

import os
import stat

from mesh.errors import ConfigError

__all__ = ["MAX_TOKEN_LENGTH", "MIN_TOKEN_LENGTH", "check_token", "read_token"]

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024


def check_token(token: str, source: str | None = None) -> str:
    """Return ``token`` if it is acceptable, else raise ``ConfigError`` saying why."""
    if not token:
        raise ConfigError("cluster token is empty", source=source)
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"cluster token is too short ({len(token)} characters, need >= {MIN_TOKEN_LENGTH}; "
            "e.g. `openssl rand -hex 32`)",
            source=source,
        )
    if len(token) > MAX_TOKEN_LENGTH:
        raise ConfigError(f"cluster token is too long ({len(token)} > {MAX_TOKEN_LENGTH} characters)", source=source)
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError("cluster token must be printable ASCII without spaces", source=source)
    return token


def read_token(path: str | os.PathLike[str]) -> str:
    """Read and validate the token file at ``path`` (rules in the module docstring)."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("cluster token file is not a regular file", source=name)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"cluster token file is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o}); chmod go-w it",
                source=name,
            )
        if st.st_size > MAX_TOKEN_LENGTH + 64:
            raise ConfigError(f"cluster token file is too large ({st.st_size} bytes)", source=name)
        with open(name, "rb") as f:
            raw = f.read(MAX_TOKEN_LENGTH + 65)
    except FileNotFoundError as exc:
        raise ConfigError("cluster token file does not exist", source=name) from exc
    except PermissionError as exc:
        raise ConfigError("cluster token file is not readable by this process", source=name) from exc
    except IsADirectoryError as exc:
        raise ConfigError("cluster token file is a directory", source=name) from exc
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ConfigError("cluster token must be printable ASCII without spaces", source=name) from exc
    return check_token(text.strip(), source=name)
