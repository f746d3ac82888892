"""Image references from untrusted clients (an MCP client, an agent's tool call) turned into loaded images, safely.

A reference is one string:

- a **path** to a file inside one of the allowed folders. Relative paths are taken relative to the first allowed
  folder. Real paths are compared, so ``..`` components, symlinks that lead out of a folder and absolute paths
  elsewhere are refused, as is anything that is not a regular file;
- **base64** of the encoded file (PNG, JPEG, WebP, ...);
- a ``data:image/<type>;base64,<payload>`` URL;
- a ``file://`` URL, only when the policy allows URLs; it then follows the path rules above.

``http(s)://`` URLs are refused. With ``allow_urls`` they are still refused, with a message that says so: this
server does not fetch remote images (it is meant to run without network access, and a fetch on a client's behalf
would let any client make the server reach internal addresses). Send the image as base64 instead.

Limits are checked before any work: the byte limit before a file is read or a base64 payload decoded, the pixel
limit from the image header before the pixels are decoded (`qzoom_agent.images.load_image`), so a small file that
claims to be 30000x30000 is refused without allocating its pixels. Every refusal raises `ImageRefError` with one
line that says what to do instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..checks import UsageError, one_line
from ..images import ImageLoadError, load_image

DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # encoded size of one image
DEFAULT_MAX_PIXELS = 100_000_000  # width * height of one image (an 8064x5241 photo is 42 MP)

# base64 of the first bytes of PNG, JPEG, GIF, WebP (RIFF) and TIFF (both byte orders) files
_BASE64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "SUkqA", "TU0AK")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=_-]+")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+(?:;[^,;]+=[^,;]*)*;base64,", re.IGNORECASE)
_MAX_PATH_CHARS = 4096


class ImageRefError(ValueError):
    """An image reference was refused or could not be loaded; ``str(err)`` is one line for the client."""


@dataclass(frozen=True)
class ImageRefPolicy:
    """What image references a server accepts. Validated on construction (`UsageError` on a bad value).

    Attributes:
        allowed_roots: folders whose files clients may name; stored as real (symlink-free, absolute) paths. Empty:
            no path is accepted, only base64 and data URLs.
        allow_urls: accept ``file://`` URLs (under the path rules); ``http(s)://`` is refused either way.
        max_bytes: largest encoded image accepted, in bytes (a file's size, a base64 payload's decoded size).
        max_pixels: largest ``width * height`` accepted, checked from the image header before decoding.
    """

    allowed_roots: tuple[Path, ...] = field(default=())  # real paths of the allowed folders
    allow_urls: bool = False  # file:// URLs allowed (remote URLs never are)
    max_bytes: int = DEFAULT_MAX_BYTES  # encoded bytes per image
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded pixels per image

    def __post_init__(self) -> None:
        roots = self.allowed_roots
        if isinstance(roots, (str, os.PathLike)) or not isinstance(roots, Iterable):
            raise UsageError(f"allowed_roots must be a list of folders, got {one_line(repr(roots))}")
        object.__setattr__(self, "allowed_roots", tuple(_real_dir(r) for r in roots))
        if not isinstance(self.allow_urls, bool):
            raise UsageError(f"allow_urls must be True or False, got {self.allow_urls!r}")
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _real_dir(root: str | os.PathLike) -> Path:
    text = os.fspath(root)
    if not text or "\0" in text:
        raise UsageError(f"allowed folder {text!r} is not a folder name; pass an existing directory (--allow-dir)")
    real = Path(os.path.realpath(os.path.expanduser(text)))
    if not real.is_dir():
        what = "does not exist" if not real.exists() else "is not a directory"
        raise UsageError(f"allowed folder {one_line(text)} {what}; pass an existing directory (--allow-dir)")
    return real


def _short(ref: str, limit: int = 80) -> str:
    """A reference as it can appear in a one-line message: one line, long ones cut."""
    text = one_line(ref)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _looks_like_base64(text: str) -> bool:
    """Base64 rather than a path: it starts like a base64-encoded image file, or it is longer than any path and
    made of base64 characters only (paths hold dots, and are short)."""
    if text.startswith(_BASE64_IMAGE_PREFIXES):
        return True
    compact = "".join(text.split())
    return len(compact) > _MAX_PATH_CHARS or (len(compact) >= 256 and _BASE64_CHARS.fullmatch(compact) is not None)


def _decode_base64(payload: str, policy: ImageRefPolicy, what: str) -> bytes:
    compact = "".join(payload.split())
    if not compact:
        raise ImageRefError(f"{what} is empty; send the encoded image file as base64")
    estimate = len(compact) * 3 // 4
    if estimate > policy.max_bytes + 2:
        raise ImageRefError(f"{what} holds about {estimate:,} bytes, over this server's limit of "
                            f"{policy.max_bytes:,}; send a smaller or more compressed image")
    urlsafe = "-" in compact or "_" in compact
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_" if urlsafe else None,
                                validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRefError(f"{what} is not valid base64 ({one_line(err)}); send the image file's bytes "
                            "base64-encoded, or a path under an allowed folder") from None
    if len(data) > policy.max_bytes:
        raise ImageRefError(f"{what} holds {len(data):,} bytes, over this server's limit of {policy.max_bytes:,}; "
                            "send a smaller or more compressed image")
    return data


def _inside(real: str, root: Path) -> bool:
    root_text = str(root)
    return real == root_text or real.startswith(root_text.rstrip(os.sep) + os.sep)


def _resolve_path(text: str, policy: ImageRefPolicy) -> str:
    """The real path of an allowed file named by ``text``, or `ImageRefError`."""
    if not policy.allowed_roots:
        raise ImageRefError("this server accepts no image paths (no allowed folders); send the image as base64 or "
                            "a data:image/...;base64, URL")
    if "\0" in text or len(text) > _MAX_PATH_CHARS:
        raise ImageRefError(f"image path {_short(text)} is not a valid path")
    if ".." in re.split(r"[\\/]", text):
        raise ImageRefError(f"image path {_short(text)} contains '..'; name the file by its path inside an "
                            "allowed folder")
    candidate = text if os.path.isabs(text) else os.path.join(policy.allowed_roots[0], text)
    real = os.path.realpath(candidate)
    if not any(_inside(real, root) for root in policy.allowed_roots):
        allowed = ", ".join(str(r) for r in policy.allowed_roots)
        raise ImageRefError(f"image path {_short(text)} is outside the allowed folders ({one_line(allowed)}); "
                            "copy the image there or send it as base64")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise ImageRefError(f"image not found: {_short(text)}") from None
    except OSError as err:
        raise ImageRefError(f"cannot read image {_short(text)} ({one_line(err.strerror or err)})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageRefError(f"image path {_short(text)} is not a regular file")
    return real


def _read_file(real: str, text: str, policy: ImageRefPolicy) -> bytes:
    """The file's bytes, with the size checked before reading; the final component is opened without following
    symlinks, so a link swapped in after the check is refused too."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError as err:
        raise ImageRefError(f"cannot read image {_short(text)} ({one_line(err.strerror or err)})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageRefError(f"image path {_short(text)} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise ImageRefError(f"image {_short(text)} is {info.st_size:,} bytes, over this server's limit of "
                                f"{policy.max_bytes:,}; send a smaller or more compressed image")
        data = handle.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:
        raise ImageRefError(f"image {_short(text)} is over this server's limit of {policy.max_bytes:,} bytes")
    return data


def _file_url_path(ref: str, policy: ImageRefPolicy) -> str:
    if not policy.allow_urls:
        raise ImageRefError("file:// URLs are not accepted by this server; send a path under an allowed folder or "
                            "the image as base64")
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise ImageRefError(f"file URL {_short(ref)} names another host; only local files are accepted")
    if parts.query or parts.fragment:
        raise ImageRefError(f"file URL {_short(ref)} has a query or fragment; send a plain file:///path URL")
    return unquote(parts.path)


def _ref_bytes(ref: str, policy: ImageRefPolicy) -> tuple[bytes, str]:
    """The encoded image bytes that ``ref`` stands for, and how to name it in messages."""
    data_url = _DATA_URL.match(ref)
    if data_url:
        return _decode_base64(ref[data_url.end():], policy, "the data URL's payload"), "<data URL>"
    scheme = _URL_SCHEME.match(ref)
    if scheme and len(scheme.group(1)) > 1:  # one letter: a Windows drive, not a scheme
        name = scheme.group(1).lower()
        if name == "data":
            raise ImageRefError("data URLs must be data:image/<type>;base64,<payload>")
        if name == "file":
            path = _file_url_path(ref, policy)
            return _read_file(_resolve_path(path, policy), path, policy), _short(path)
        if name in ("http", "https"):
            why = ("this server does not fetch remote images (it has no network access)" if policy.allow_urls
                   else "URLs are not accepted by this server")
            raise ImageRefError(f"{why}; download the image and send it as base64 or a path under an allowed folder")
        if ref[scheme.end():].startswith("//"):
            raise ImageRefError(f"{name}:// URLs are not accepted; send the image as base64 or a path under an "
                                "allowed folder")
    if _looks_like_base64(ref):
        data = _decode_base64(ref, policy, "the base64 image")
        return data, f"<{len(data):,} bytes of base64>"
    return _read_file(_resolve_path(ref, policy), ref, policy), _short(ref)


def resolve_image_ref(ref: str, policy: ImageRefPolicy) -> Image.Image:
    """Load the image a client named, under ``policy``.

    Args:
        ref: a path inside an allowed folder, base64 of the image file, a ``data:image/...;base64,`` URL, or (when
            the policy allows URLs) a ``file://`` URL.
        policy: the allowed folders and limits.

    Returns:
        The decoded RGB image (see `qzoom_agent.images.load_image`).

    Raises:
        ImageRefError: the reference was refused (outside the folders, a URL, over a limit) or is not a readable
            image; the message is one line and says what to send instead.
    """
    if not isinstance(ref, str):
        raise ImageRefError(f"the image must be a string (a path or base64), got {type(ref).__name__}")
    ref = ref.strip()
    if not ref:
        raise ImageRefError("the image is empty; send a path under an allowed folder or the image as base64")
    data, label = _ref_bytes(ref, policy)
    try:
        return load_image(data, max_pixels=policy.max_pixels)
    except ImageLoadError as err:
        message = one_line(err).replace(f"<{len(data)} bytes>", label)  # name the client's reference
        if "over the limit" in message:  # load_image's advice (max_pixels=...) is for the server, not the client
            message = message.split("; pass max_pixels")[0] + f"; send a smaller image ({label})"
        raise ImageRefError(message) from None
