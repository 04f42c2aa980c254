"""Text corpora as next-token windows, fully offline; bytes are the tokens (vocabulary 256).

- ``pystdlib``: the Python standard library's own sources, a code corpus every CPython 3.11 carries.
  The files are the fixed, sorted list ``PYSTDLIB_FILES`` (28 pure-Python modules, 1.5 MB on CPython
  3.11.7), read from ``sysconfig.get_paths()["stdlib"]`` or from ``data_dir``. The selection is the
  same on every 3.11; patch releases edit a few lines, so the bundle records the corpus's SHA-256.
- ``text``: bring your own: every regular file under ``data_dir`` (recursively, sorted by relative
  path, hidden files and directories skipped), read as bytes.

The files are joined with a newline between them and cut into disjoint chunks of ``block_size + 1``
bytes; chunk c gives the input ``x = c[:-1]`` and the targets ``y = c[1:]`` (the next byte at every
position). A fixed-seed permutation of the chunks puts ``VALIDATION_FRACTION`` of them in the
validation split (the "test" split of the bundle), the same for every run; ``train_limit`` /
``test_limit`` then keep a subset seeded by the run's seed, as for the image datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from pathlib import Path

import torch

from sazd.data.bundle import DataBundle, DatasetNotFoundError, subset

TEXT_DATASETS = ("pystdlib", "text")
VOCAB_SIZE = 256
BLOCK_SIZE = 64
VALIDATION_FRACTION = 0.1
SPLIT_SEED = 0  # the validation windows do not change with --seed
PYSTDLIB_FILES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py", "dataclasses.py",
    "datetime.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py",
    "pathlib.py", "pickle.py", "random.py", "shutil.py", "statistics.py", "string.py", "subprocess.py",
    "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "typing.py", "zipfile.py",
)


@dataclasses.dataclass
class TextBundle(DataBundle):
    """A ``DataBundle`` of token windows: ``*_x`` and ``*_y`` int64 (N, block_size); ``in_shape`` is
    (block_size,) and ``num_classes`` the vocabulary. ``mean``/``std`` are 0/1 (tokens are not scaled)."""

    files: tuple[str, ...] = ()
    corpus_bytes: int = 0
    sha256: str = ""

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextBundle:
        """A copy on ``device``; tokens stay int64 whatever ``dtype`` asks (it sets the model's)."""
        return dataclasses.replace(self, **{key: getattr(self, key).to(device=device)
                                            for key in ("train_x", "train_y", "test_x", "test_y")})


def corpus_files(name: str, data_dir: str | Path | None) -> tuple[Path, list[str]]:
    """The directory and the sorted relative paths of the files that make up corpus ``name``."""
    if name == "pystdlib":
        root = Path(data_dir if data_dir is not None else sysconfig.get_paths()["stdlib"])
        missing = [f for f in PYSTDLIB_FILES if not (root / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"dataset 'pystdlib': {root} lacks {missing}; it needs the Python standard library's "
                "sources (a CPython 3.11 install has them): pass --data-dir with the directory holding "
                f"{list(PYSTDLIB_FILES[:3])}..., or use --dataset text --data-dir DIR for your own files"
            )
        return root, list(PYSTDLIB_FILES)
    if name != "text":
        raise ValueError(f"dataset: {name!r} is not a text corpus; choose one of {list(TEXT_DATASETS)}")
    if data_dir is None:
        raise ValueError("dataset 'text' reads your files: pass --data-dir DIR (data_dir=DIR)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset 'text': {root} is not a directory; pass --data-dir DIR")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DatasetNotFoundError(f"dataset 'text': {root} holds no files; put text files in it")
    return root, files


def load_text(name: str, data_dir: str | Path | None = None, train_limit: int | None = None,
              test_limit: int | None = None, seed: int = 0, block_size: int = BLOCK_SIZE) -> TextBundle:
    """Corpus ``name`` as next-token windows of ``block_size`` (see the module docstring)."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: {block_size!r} must be a positive integer")
    root, files = corpus_files(name, data_dir)
    data = b"\n".join((root / f).read_bytes() for f in files)
    chunks = len(data) // (block_size + 1)
    if chunks < 2:
        raise ValueError(
            f"dataset {name!r}: {len(data)} bytes in {root} make {chunks} window(s) of {block_size + 1} "
            "bytes; a train and a validation split need at least 2: add text"
        )
    tokens = torch.frombuffer(bytearray(data[: chunks * (block_size + 1)]), dtype=torch.uint8)
    windows = tokens.to(torch.int64).view(chunks, block_size + 1)
    order = torch.randperm(chunks, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, round(VALIDATION_FRACTION * chunks))
    val, train = windows[order[:n_val].sort().values], windows[order[n_val:].sort().values]
    train_x, train_y = subset(train[:, :-1], train[:, 1:], train_limit, seed, "train_limit")
    test_x, test_y = subset(val[:, :-1], val[:, 1:], test_limit, seed, "test_limit")
    return TextBundle(name=name, train_x=train_x.contiguous(), train_y=train_y.contiguous(),
                      test_x=test_x.contiguous(), test_y=test_y.contiguous(), in_shape=(block_size,),
                      num_classes=VOCAB_SIZE, mean=0.0, std=1.0, files=tuple(files), corpus_bytes=len(data),
                      sha256=hashlib.sha256(data).hexdigest())
