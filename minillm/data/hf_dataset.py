"""A Hugging Face dataset as a corpus (the optional extra: ``pip install -e ".[hf]"``).

    hf_splits(data cfg)        the training split and the validation split (or None) as HFSplit
    HFSplit.fingerprint()      what identifies its data for the prepared-data cache key
    HFSplit.records(f, skip)   (row, text) of every row, streamed (formats.iter_records calls it)
    check_split(split, ...)    the checking pass over a split (counts, bad rows) -> corpus.FileInfo

``data.hf_dataset`` is one of three kinds:
    disk    a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: read with
            ``datasets.load_from_disk`` (memory-mapped Arrow files, read a batch of rows at a time)
    folder  any other local folder (parquet, jsonl, csv ... files in the layout ``load_dataset`` reads):
            ``datasets.load_dataset(folder, streaming=True)``, so nothing is converted or copied
    hub     a name such as ``user/dataset``: ``load_dataset(name, streaming=True)``, over the network

Rows are streamed in batches, never materialised, so memory does not grow with the dataset. Each row
is one document, its text in ``data.text_field`` (a dotted path reaches into a struct column). The
``datasets`` library is imported here only, and only when a split is opened: reading files never
needs it. The cache key of a disk or folder dataset covers the sha256 of every file under the folder
(an edit makes a fresh entry); a hub dataset is keyed by its name, configuration and split.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from minillm.config import DataConfig
from minillm.data.corpus import CheckBar, FileInfo, problem_error, sha256_file, usable
from minillm.data.formats import RecordError, field_records, no_column, scan_records
from minillm.errors import DataError

log = logging.getLogger(__name__)
_BATCH = 1024  # rows read at once
INSTALL = 'pip install -e ".[hf]"'


def _datasets() -> Any:
    """The ``datasets`` module, or a DataError saying how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data.hf_dataset needs the Hugging Face datasets library, which is not installed; "
                        f"install it with {INSTALL}") from e
    return datasets


@dataclass(frozen=True)
class HFSplit:
    """One split of a Hugging Face dataset. ``split`` None: a saved single Dataset, used whole."""
    spec: str            # data.hf_dataset as given
    kind: str            # "disk", "folder" or "hub"
    config: str | None
    split: str | None
    key: str = "data.hf_split"   # the setting that names this split (data.hf_val_split: the validation one)

    def __str__(self) -> str:  # how messages name it
        split = self.split or ("train" if self.kind != "disk" else None)
        return f"data.hf_dataset={self.spec}" + (f" (split {split})" if split else "")

    @property
    def path(self) -> Path:
        return Path(self.spec).expanduser()

    def fingerprint(self) -> str:
        """sha256 over every non-hidden file under the folder (relative path and content sha256), so
        any edit changes it; a hub dataset: over its name, configuration and split."""
        h = hashlib.sha256(f"{self.kind}\0{self.config}\0{self.split}\0".encode())
        if self.kind == "hub":
            return h.update(self.spec.encode()) or h.hexdigest()
        root = self.path
        for p in sorted(p for p in root.rglob("*") if p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)):
            h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\0".encode())
        return h.hexdigest()

    def open(self) -> Any:
        """The split as a ``datasets.Dataset`` (disk) or streaming ``IterableDataset``; DataError if
        the library is missing or the dataset, configuration or split cannot be opened."""
        ds = _datasets()
        try:
            with _quiet_hub():
                if self.kind == "disk":
                    return self._pick(ds.load_from_disk(str(self.path)), ds)
                return ds.load_dataset(self._source, self.config, split=self.split or "train", streaming=True)
        except DataError:
            raise
        except Exception as e:  # datasets raises many kinds (ValueError, FileNotFoundError, hub errors)
            raise self._open_error(e, ds) from e

    @property
    def _source(self) -> str:
        return str(self.path) if self.kind == "folder" else self.spec

    def _open_error(self, e: Exception, ds: Any) -> DataError:
        """The one-line error for a split that ``datasets`` could not open."""
        if isinstance(e, ValueError) and str(e).startswith("Bad split") and (names := self._split_names(ds)):
            return self._no_split(names)
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if self.kind != "hub" else (
            " (HF_HUB_OFFLINE is set and no copy is cached: unset it to download the dataset, or give a local folder)"
            if ds.config.HF_HUB_OFFLINE else " (a hub dataset is downloaded: with no network, use a cached copy "
            "with HF_HUB_OFFLINE=1, or a local folder)")
        fix = (f"save the dataset again (save_to_disk), or check data.hf_dataset and {self.key}" if self.kind == "disk"
               else f"check data.hf_dataset, data.hf_config and {self.key}")
        return DataError(f"{self}: cannot be opened ({type(e).__name__}: {what}){where}; {fix}")

    def _split_names(self, ds: Any) -> list[str]:
        """The dataset's split names, or [] when they cannot be had."""
        try:
            with _quiet_hub():
                return list(ds.get_dataset_split_names(self._source, self.config))
        except Exception:  # noqa: BLE001 - the caller falls back to datasets' own message
            return []

    def _no_split(self, names: Any) -> DataError:
        unset = " or leave it unset (data.val_fraction holds out rows)" if self.key == "data.hf_val_split" else ""
        return DataError(f"{self}: no such split (it has {', '.join(names)}); set {self.key} to one of them{unset}")

    def _pick(self, saved: Any, ds: Any) -> Any:
        """The split of a saved DatasetDict, or a saved Dataset itself."""
        if isinstance(saved, ds.DatasetDict):
            if (self.split or "train") not in saved:
                raise self._no_split(saved)
            return saved[self.split or "train"]
        if self.split is not None and self.split != saved.split:
            raise DataError(f"{self}: the folder holds one saved Dataset (split {saved.split}), not a DatasetDict; "
                            "leave data.hf_split and data.hf_val_split unset (data.val_fraction holds out rows)")
        return saved

    def records(self, field: str, skip_bad: bool = False) -> Iterator[tuple[int, str | RecordError]]:
        """(row from 0, text) of every row, a batch of rows at a time. A bad row raises RecordError
        naming it (with ``skip_bad``: comes as its error); no such column: RecordError listing them."""
        d, top = self.open(), field.split(".")[0]
        columns = d.column_names
        if columns is not None and top not in columns:
            raise no_column(top, list(columns))
        files = self._arrow_files(d)

        def values() -> Iterator[Any]:
            if files:
                yield from _stream_column(files, top)
                return
            for batch in (d.select_columns([top]) if columns is not None else d).iter(batch_size=_BATCH):
                if top not in batch:
                    raise no_column(top, list(batch))
                yield from batch[top]
        return field_records(values(), field, skip_bad)

    def _arrow_files(self, d: Any) -> list[str] | None:
        """The Arrow files of a saved dataset, in row order, when they hold exactly its rows (no indices
        mapping): read as streams, their pages do not stay mapped in the process as datasets' memory map
        does (which kept the whole split resident: +1 MB of RSS per MB read)."""
        if self.kind != "disk" or getattr(d, "_indices", None) is not None:
            return None
        return [c["filename"] for c in d.cache_files] or None

    def rows(self) -> int | None:
        """The number of rows if known without reading them (a saved Dataset; else the metadata). A split
        that cannot be opened is its DataError here already: reading it would fail the same way, after a
        second wait on an unreachable hub (huggingface_hub retries with backoff, about half a minute)."""
        d = self.open()
        try:
            if hasattr(d, "num_rows") and d.num_rows is not None:
                return int(d.num_rows)
            return int(d.info.splits[self.split or "train"].num_examples)
        except (KeyError, TypeError, AttributeError):
            return None

    def file_bytes(self) -> int | None:
        """Bytes of the split's data files in a local folder, as ``datasets`` assigns files to splits
        (compressed Parquet counts at its compressed size); None for other kinds or when it cannot say."""
        if self.kind != "folder":
            return None
        try:
            files = _datasets().load_dataset_builder(str(self.path), self.config).config.data_files
            return sum(Path(f).stat().st_size for f in files[self.split or "train"])
        except (DataError, KeyError, OSError, ValueError, TypeError, AttributeError):
            return None


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's warnings (each retry of an unreachable hub, twice: its own handler and the root
    logger's) held back while a dataset is opened; the error raised says what went wrong."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _stream_column(files: list[str], column: str) -> Iterator[Any]:
    """The values of ``column`` in Arrow IPC stream files (what save_to_disk writes), a record batch at a
    time, read with plain reads (bounded memory) rather than a memory map."""
    import pyarrow as pa
    for name in files:
        try:
            with pa.OSFile(name) as src:
                for batch in pa.ipc.open_stream(src):
                    yield from batch.column(column).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise RecordError(f"{name} is not a readable Arrow file ({str(e).strip().splitlines()[0]}); save the "
                              "dataset again") from e


def hf_splits(cfg: DataConfig) -> tuple[HFSplit, HFSplit | None]:
    """(training split, validation split or None) of ``cfg.hf_dataset``; DataError for a path that
    is not a folder. Nothing is opened yet."""
    spec = str(cfg.hf_dataset)
    path = Path(spec).expanduser()
    if path.is_dir():
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        kind = "disk" if saved else "folder"
        if kind == "disk" and cfg.hf_config is not None:
            raise DataError(f"data.hf_config={cfg.hf_config}: a dataset saved with save_to_disk "
                            f"({spec}) has no configurations; leave it unset")
    elif path.exists():
        raise DataError(f"data.hf_dataset={spec}: is a file, not a dataset folder; give a folder (save_to_disk or "
                        "dataset files) or a hub name, or use data.path for files")
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise DataError(f"data.hf_dataset={spec}: no such folder; give a save_to_disk folder, a dataset folder, "
                        "or a hub name (user/dataset)")
    else:
        kind = "hub"
    val = HFSplit(spec, kind, cfg.hf_config, cfg.hf_val_split, "data.hf_val_split") if cfg.hf_val_split else None
    return HFSplit(spec, kind, cfg.hf_config, cfg.hf_split), val


def check_split(split: HFSplit, field: str, skip_bad: bool, progress: bool = False,
                fingerprint: str | None = None) -> list[FileInfo]:
    """The checking pass over every row of ``split`` (a progress bar of rows, text bytes beside them):
    [its FileInfo, sha256 = ``fingerprint`` (default: computed)]. A bad row is a DataError naming it
    (``skip_bad``: counted, with a warning); no text at all is a DataError."""
    bar = CheckBar(split.rows() if progress else None, progress, by_documents=True)
    try:
        r = scan_records(split, "hf", field, skip_bad, bar)
    finally:
        bar.close()
    if r.problem is not None:  # a bad row can be skipped; a missing column or unreadable data cannot
        raise problem_error(split, r.problem, "data.skip_invalid=true") if r.problem.startswith("row ") \
            else DataError(f"{split}: {r.problem}")
    if r.bad:
        log.warning("%s: skipped %d bad rows (the first: %s)", split, r.bad, r.first_bad)
    info = FileInfo(split, r.text_bytes, fingerprint or split.fingerprint(), r.has_text, None, "hf", field,
                    r.documents, r.empty, r.bad)
    return usable([info], [split], "data.hf_dataset")
