"""Helpers the benchmark adapters share: finding a split's shards in a hub snapshot, reading them through
``datasets``, loading a hub id, checking columns, decoding images lazily and assembling the :class:`Task`.

Tables are read with ``datasets`` (``load_dataset("parquet", data_files=...)`` and its csv/json/arrow siblings), which
memory-maps them from its Arrow cache: text columns are read once, an image column only for the row an agent asks
for, so a 5,000-question split opens in seconds and holds no decoded image.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .base import BenchDataError, BenchItem, Task

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".tsv": "csv",
             ".csv": "csv"}


@dataclass(frozen=True)
class TaskInfo:
    """What a task fixes besides its items: name, preset, official split size and the reference's token budget."""

    name: str
    preset: str
    full_size: int
    max_new_tokens: int


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a hub id (``owner/name``) and is not a path that exists here."""
    return not Path(source).expanduser().exists() and bool(_HUB_ID.match(source))


def local_path(source: str, task: str, hint: str) -> Path:
    """``source`` as an existing local path.

    Raises:
        BenchDataError: it does not exist (``hint`` says what to pass instead).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise BenchDataError(f"{task}: no such file or folder {source!r}; {hint}")
    return path


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence ``datasets``' progress bars while reading (they would interleave with the runner's output)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_hub(hub_id: str, *, config: str | None, split: str, task: str) -> datasets.Dataset:
    """One split of a hub dataset through ``datasets.load_dataset``.

    Raises:
        BenchDataError: the hub cannot be reached (offline) or has no such dataset, config or split; the message
            says to download a snapshot and pass its folder.
    """
    import datasets

    try:
        with _quiet_progress():
            return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure of the hub read becomes one actionable message
        logger.debug("hub read of %s failed", hub_id, exc_info=True)
        cfg = f" {config}" if config else ""
        raise BenchDataError(
            f"{task}: could not load hub dataset {hub_id!r} (config{cfg or ' default'}, split {split}; no local path "
            f"of that name either): {_first_line(exc)}; offline, pass a local folder instead: `huggingface-cli "
            f"download --repo-type dataset {hub_id} --local-dir DIR`, then {task}:DIR") from None


def find_split_files(root: Path, split: str, subdirs: Sequence[str] = ("data",)) -> list[Path]:
    """The shards of ``split`` in a hub snapshot folder, sorted (the hub's own order).

    Looks in ``root/SUBDIR`` for each subdir, then in ``root`` itself, for ``SPLIT-*.EXT`` (the hub's shard names),
    ``SPLIT.EXT`` and ``SPLIT/*.EXT`` (the parquet-converter layout), EXT one of parquet, arrow, jsonl.
    """
    for base in [*(root / s for s in subdirs), root]:
        for ext in ("parquet", "arrow", "jsonl"):
            found = sorted(base.glob(f"{split}-*.{ext}")) or sorted(base.glob(f"{split}.{ext}"))
            found = found or sorted(base.glob(f"{split}/*.{ext}"))
            if found:
                return found
    return []


def load_files(files: Sequence[Path], task: str, **read_kwargs: Any) -> datasets.Dataset:
    """The rows of ``files`` (one format: parquet, arrow, jsonl, tsv or csv) as one ``datasets.Dataset``.

    Raises:
        BenchDataError: an unknown file type, or files ``datasets`` cannot read.
    """
    import datasets

    suffixes = {f.suffix.lower() for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
        raise BenchDataError(f"{task}: cannot read {', '.join(str(f) for f in files[:3])}; expected parquet, arrow, "
                             "jsonl or tsv files of the benchmark's hub snapshot")
    suffix = suffixes.pop()
    if suffix == ".tsv":
        read_kwargs = {"sep": "\t", "keep_default_na": False, "features": _all_text(files[0]), **read_kwargs}
    try:
        with _quiet_progress():
            return datasets.load_dataset(_BUILDERS[suffix], data_files=[str(f) for f in files], split="train",
                                         **read_kwargs)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file becomes one actionable message
        logger.debug("reading %s failed", files, exc_info=True)
        raise BenchDataError(f"{task}: cannot read {files[0]}: {_first_line(exc)}; pass the benchmark's hub "
                             "snapshot folder or one of its data files") from None


def _all_text(tsv: Path) -> datasets.Features:
    """Every column of a TSV as text: pandas would otherwise turn an all-number option column into floats ("3.0")
    and an option reading "None" or "NA" into a missing value."""
    import datasets

    with tsv.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    return datasets.Features({name: datasets.Value("string") for name in header})


def load_saved(root: Path, split: str, task: str) -> datasets.Dataset | None:
    """A folder written by ``Dataset.save_to_disk`` (or a DatasetDict's), else None."""
    import datasets

    if not ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        return None
    try:
        saved = datasets.load_from_disk(str(root))
    except Exception as exc:  # noqa: BLE001
        raise BenchDataError(f"{task}: cannot read the saved dataset {root}: {_first_line(exc)}") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise BenchDataError(f"{task}: {root} has splits {', '.join(saved)}, not {split}")
        return saved[split]
    return saved


def open_table(source: str, *, task: str, hub_id: str, split: str, hub_config: str | None = None,
               subdirs: Sequence[str] = ("data",)) -> tuple[datasets.Dataset, str]:
    """The rows of one split from a data file, a hub snapshot folder or a hub id, and the source as read.

    Raises:
        BenchDataError: nothing readable there; the message names what was looked for.
    """
    if is_hub_id(source):
        return load_hub(source, config=hub_config, split=split, task=task), source
    hint = f"pass a snapshot folder of the hub dataset {hub_id} or one of its {split} files"
    path = local_path(source, task, hint)
    if path.is_file():
        return load_files([path], task), str(path)
    saved = load_saved(path, split, task)
    if saved is not None:
        return saved, str(path)
    files = find_split_files(path, split, subdirs)
    if not files:
        where = ", ".join(f"{s}/{split}-*.parquet" for s in subdirs)
        raise BenchDataError(f"{task}: no {split} shards in {path} (looked for {where} and {split}-*.parquet); {hint}")
    return load_files(files, task), str(path)


def require_columns(ds: datasets.Dataset, needed: Sequence[str], task: str, source: str, hub_id: str) -> None:
    """Raise unless ``ds`` has every column in ``needed``.

    Raises:
        BenchDataError: naming the missing columns and the ones present.
    """
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise BenchDataError(f"{task}: {source} lacks the column(s) {', '.join(missing)} (it has "
                             f"{', '.join(ds.column_names)}); pass a snapshot of the hub dataset {hub_id}")


def columns(ds: datasets.Dataset, names: Sequence[str], stop: int) -> dict[str, list[Any]]:
    """The values of the text columns ``names`` for rows ``0..stop-1`` (no image column is decoded)."""
    return ds.select_columns(list(names)).select(range(stop))[:]


def decode_image(value: Any, name: str) -> Image.Image:
    """An image stored as a PIL image, ``{"bytes", "path"}``, raw bytes, a file path or a base64 string, decoded to
    RGB by the library's safe loader (`images.load_image`: size limit checked before decoding, EXIF orientation,
    alpha over white), as every agent's own input is.

    Raises:
        BenchDataError: nothing decodable (``name`` says which image).
    """
    from ...images import load_image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, (str, Path, bytes, bytearray, Image.Image)):
        raise BenchDataError(f"image {name} is empty ({type(value).__name__})")
    try:
        if isinstance(value, str) and not (len(value) < 1024 and Path(value).is_file()):
            value = base64.b64decode(value)  # as HR-Bench and MME-RealWorld store their images
        return load_image(value)
    except (binascii.Error, ValueError) as exc:  # ImageLoadError is a ValueError
        raise BenchDataError(f"cannot decode image {name}: {_first_line(exc)}") from None


def row_image(ds: datasets.Dataset, column: str, row: int, name: str) -> Callable[[], Image.Image]:
    """A loader that decodes ``column`` of row ``row`` when called (only that cell is read)."""

    def load() -> Image.Image:
        return decode_image(ds[row][column], name)

    return load


def file_image(path: Path) -> Callable[[], Image.Image]:
    """A loader that decodes the image file ``path`` when called (:func:`decode_image`)."""
    return lambda: decode_image(path, str(path))


def check_limit(limit: int | None, size: int) -> int:
    """How many rows to read: ``size``, or the first ``limit`` of them.

    Raises:
        BenchDataError: a negative limit.
    """
    if limit is None:
        return size
    if limit < 0:
        raise BenchDataError(f"limit must be 0 or more, not {limit}")
    return min(limit, size)


def finish_task(info: TaskInfo, items: list[BenchItem], source: str, missing: Sequence[str] = ()) -> Task:
    """The :class:`Task` of ``items`` (already in their stable order) with the benchmark's scorer."""
    from .scorers import SCORERS  # imported here: the scorers live in their own module, loaded when a task is built

    assert all(item.index == i for i, item in enumerate(items)), "items must be numbered in order"
    logger.info("%s: %d questions from %s (%d images missing)", info.name, len(items), source, len(missing))
    return Task(name=info.name, items=tuple(items), score=SCORERS[info.name], preset=info.preset,
                full_size=info.full_size, max_new_tokens=info.max_new_tokens, source=source, missing=tuple(missing))


def cell(value: Any) -> str:
    """A cell as text: None and NaN become ``""`` (pandas writes absent options as NaN), a whole float an integer
    (an id column that pandas stored as float)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def answer_list(value: Any) -> tuple[str, ...]:
    """Reference answers from a list column or a single string."""
    if isinstance(value, (list, tuple)):
        return tuple(cell(v) for v in value)
    return (cell(value),)
