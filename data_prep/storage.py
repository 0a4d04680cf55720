"""Where the data_prep tools read and write: a local folder, or a bucket URL (`gs://bucket/prefix`).

A location is a `pathlib.Path` (local) or a `str` URL; `location()` makes one from a command-line value and
`join()` extends one without losing its `//` (which `pathlib` would fold). Local paths keep the tools' local
behaviour (locks, atomic renames, fsync) unchanged; every function here does exactly that on them.

For a URL the tools work in a local staging folder and move whole files between it and the bucket through
TensorStore's key-value stores, the same client, credentials and endpoint TensorStore uses for the volumes
(docs/operations.md "Data preparation on gs://"). Local staging is needed because ArrayRecord's writer only
writes local files, and an object store has no rename to publish a finished folder with:

* `Mirror`: a dataset's small files (manifest, dataset.json, stats.json) copied into a staging folder,
  read and written there with the local code, and `push`ed back one object at a time;
* `writing(target)`: a folder (a zarr array) written locally, then uploaded with its marker file last, so a
  reader never opens a half-uploaded array;
* `local_copy(source)`: an input file downloaded for the duration of a block (a NIfTI volume, a reports file,
  label names); `named_as` makes a reader's refusal name the object instead of the download;
* `local_folder(base, names)`: several objects under one prefix downloaded into a temporary folder with the
  same relative layout (the files of one DICOM series), removed after the block;
* `read_heads(urls, size)`: the first bytes of many objects, requested concurrently (DICOM headers);
* `publish_dir(tmp, output)`: a finished output folder uploaded, its index file last.
"""
from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

import tensorstore as ts

Location = pathlib.Path | str


def is_url(value: Location) -> bool:
    """Whether `value` names a bucket object or prefix (`gs://...`, any `scheme://`) rather than a local path."""
    return isinstance(value, str) and "://" in value


def location(value: str) -> Location:
    """A command-line path: a URL kept as text (without a trailing "/"), anything else a `pathlib.Path`."""
    return value.rstrip("/") if is_url(value) else pathlib.Path(value)


def join(base: Location, *parts: str) -> Location:
    """`base / part / ...`, for a URL as text."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return pathlib.Path(base).joinpath(*parts)


def name(value: Location) -> str:
    return str(value).rstrip("/").rsplit("/", 1)[-1] if is_url(value) else pathlib.Path(value).name


@contextlib.contextmanager
def _naming(url: str) -> Iterator[None]:
    # TensorStore's errors (ValueError) do not always name the object; the tools report OSError as one line.
    try:
        yield
    except ValueError as e:
        raise OSError(f"{url}: {e}") from e


def _store(url: str) -> ts.KvStore:
    # A key-value store whose keys are the object names under `url/`.
    return ts.KvStore.open(str(url).rstrip("/") + "/").result()


def _parent_and_key(url: str) -> tuple[ts.KvStore, str]:
    parent, _, key = str(url).rstrip("/").rpartition("/")
    return _store(parent), key


def read_bytes(url: str) -> bytes | None:
    """The object at `url`, or None when there is none."""
    with _naming(url):
        store, key = _parent_and_key(url)
        result = store.read(key).result()
    return None if result.state == "missing" else bytes(result.value)


def read_heads(urls: Sequence[str], size: int, in_flight: int = 64) -> Iterator[bytes | None]:
    """The first `size` bytes of each object of `urls` (all of a shorter one; None for a missing one), in
    order, with up to `in_flight` requests outstanding at once."""
    for start in range(0, len(urls), in_flight):
        chunk = urls[start:start + in_flight]
        with _naming(chunk[0]):
            futures = [store.read(key, byte_range=slice(0, size))
                       for store, key in (_parent_and_key(url) for url in chunk)]
        for url, future in zip(chunk, futures):
            try:
                result = future.result()
            except ValueError as e:
                # A range past the end of a shorter object is refused as a whole (OUT_OF_RANGE): read all of it.
                if "OUT_OF_RANGE" not in str(e):
                    raise OSError(f"{url}: {e}") from e
                yield read_bytes(url)
                continue
            yield None if result.state == "missing" else bytes(result.value)


def write_bytes(url: str, data: bytes) -> None:
    """Writes the object at `url` (one request: readers see the old object or the new one)."""
    with _naming(url):
        store, key = _parent_and_key(url)
        store.write(key, data).result()


def list_names(folder: Location) -> list[str]:
    """Relative names of the files under `folder` (recursive, sorted); [] when there are none."""
    if is_url(folder):
        with _naming(folder):
            return sorted(key.decode() for key in _store(folder).list().result())
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def children(folder: Location) -> list[str]:
    """Names of the entries directly in `folder` (sorted), as `iterdir` gives them; [] when it is absent."""
    if is_url(folder):
        return sorted({n.split("/", 1)[0] for n in list_names(folder)})
    folder = pathlib.Path(folder)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def exists(target: Location) -> bool:
    """Whether `target` is a file, or a folder (for a URL: a prefix with at least one object under it)."""
    if is_url(target):
        return read_bytes(target) is not None or bool(list_names(target))
    return pathlib.Path(target).exists()


def remove(target: Location) -> None:
    """Deletes the file or folder `target` with everything under it; nothing when it is absent."""
    if is_url(target):
        with _naming(target):
            _store(target).delete_range(ts.KvStore.KeyRange()).result()
            store, key = _parent_and_key(target)
            store.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()  # the object named `target` itself
        return
    target = pathlib.Path(target)
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def upload(local: pathlib.Path, url: str, last: Sequence[str] = ()) -> None:
    """Copies the file or folder `local` to `url`; in a folder, the files named in `last` (relative names)
    go after all the others, so their presence means the rest is there."""
    if local.is_file():
        write_bytes(url, local.read_bytes())
        return
    names = list_names(local)
    for relative in sorted(names, key=lambda n: (n in last, n)):
        write_bytes(join(url, relative), (local / relative).read_bytes())


def download(url: str, local: pathlib.Path) -> bool:
    """Copies the object at `url` to the file `local`; False (and nothing written) when there is none."""
    data = read_bytes(url)
    if data is None:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    return True


@contextlib.contextmanager
def local_copy(source: Location) -> Iterator[pathlib.Path]:
    """`source` as a local file for the block: itself when local, else a download (same file name, so a reader
    that goes by the suffix still does) deleted afterwards."""
    if not is_url(source):
        yield pathlib.Path(source)
        return
    with local_folder(source.rstrip("/").rsplit("/", 1)[0], [name(source)]) as folder:
        yield folder / name(source)


@contextlib.contextmanager
def named_as(local: pathlib.Path, source: Location) -> Iterator[None]:
    """Re-raises a ValueError (a reader's refusal) that names the download `local` as one naming `source`,
    so a refusal points at the bucket object, not at a temporary file."""
    try:
        yield
    except ValueError as e:
        if str(local) == str(source) or str(local) not in str(e):
            raise
        try:
            renamed = type(e)(str(e).replace(str(local), str(source)))
        except TypeError:  # a ValueError subclass built from other arguments (json's): kept as it is
            raise e from None
        raise renamed from e


@contextlib.contextmanager
def local_folder(base: str, names: Sequence[str]) -> Iterator[pathlib.Path]:
    """The objects `base/name` for each of `names` (relative names) downloaded into a temporary folder at the
    same relative paths, for the block; deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="flexict-input-") as tmp:
        for relative in names:
            if not download(join(base, relative), pathlib.Path(tmp) / relative):
                raise FileNotFoundError(f"{join(base, relative)}: no such object")
        yield pathlib.Path(tmp)


@contextlib.contextmanager
def writing(target: Location, marker: str) -> Iterator[pathlib.Path]:
    """The local path to write the folder `target` at: `target` itself when local; for a URL a path in a
    temporary folder, uploaded to `target` when the block completes (its `marker` file last), refused when
    `target` already holds files (nothing is overwritten)."""
    if not is_url(target):
        yield pathlib.Path(target)
        return
    if list_names(target):
        raise FileExistsError(f"{target}: already exists; refusing to overwrite it")
    with tempfile.TemporaryDirectory(prefix="flexict-output-") as tmp:
        local = pathlib.Path(tmp) / name(target)
        yield local
        upload(local, target, last=(marker,))


def publish_dir(tmp: pathlib.Path, output: str, index_file: str) -> None:
    """Uploads the finished folder `tmp` to the URL `output`: its files, then `index_file` (what readers open
    first, so it marks a complete output), then deletes the objects of an earlier output that the new one
    does not have. The old index is deleted first, so no reader pairs it with the new files."""
    old = set(list_names(output))
    if index_file in old:
        remove(join(output, index_file))
    upload(tmp, output, last=(index_file,))
    for stale in sorted(old - set(list_names(tmp))):
        remove(join(output, stale))


class Mirror:
    """A dataset folder's small files in a local folder, where the local code reads and writes them.

    For a local dataset the mirror is the dataset folder itself and `push` does nothing. For a URL it is a new
    staging folder into which the files named `names` are downloaded (those that exist); `push(name)` uploads
    one back, `push(name, every_s=S)` only when S seconds passed since its last upload (a growing manifest is
    not re-sent after every line).
    """

    def __init__(self, dataset: Location, names: Sequence[str], required: Sequence[str] = ()):
        """`required`: names among `names` without which the dataset is refused (FileNotFoundError naming the
        URL; a local dataset is left to the local code's own checks)."""
        self.dataset = dataset
        self._pushed: dict[str, float] = {}
        if not is_url(dataset):
            self.local = pathlib.Path(dataset)
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="flexict-dataset-")
        self.local = pathlib.Path(self._tmp.name)
        for file_name in names:
            if not download(join(dataset, file_name), self.local / file_name) and file_name in required:
                self._tmp.cleanup()
                raise FileNotFoundError(f"{join(dataset, file_name)}: not found (not an ingested dataset?)")

    def fetch(self, relative: str) -> None:
        """Downloads one more file of the dataset into the mirror (for a URL)."""
        if is_url(self.dataset):
            download(join(self.dataset, relative), self.local / relative)

    def push(self, relative: str, every_s: float = 0.0) -> None:
        if not is_url(self.dataset) or not (self.local / relative).is_file():
            return
        now = time.monotonic()
        if now - self._pushed.get(relative, -float("inf")) >= every_s:
            upload(self.local / relative, join(self.dataset, relative))
            self._pushed[relative] = now

    def close(self) -> None:
        if is_url(self.dataset):
            self._tmp.cleanup()

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
