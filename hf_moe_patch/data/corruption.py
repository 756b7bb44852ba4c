"""Seeded text corruption for robustness runs (evaluation texts, and training text in issue 4).

Two noise models:

- ``junk``: the USMoE paper's setting. After each word, with probability ``rate``, a junk token
  is inserted: a run of 2-4 copies of one random capital letter (``"AAA"``, ``"QQ"``) or one of a
  few symbol strings (``"@@"``, ``"#$%"``, ``"~~~"``). The expected number of junk tokens is
  ``rate`` times the word count.
- ``char``: each character, with probability ``rate``, is deleted, replaced by a random lower-case
  letter, duplicated, or swapped with the next one (each edit equally likely).

The random stream of a text is seeded by ``(seed, text)`` alone, so a text is corrupted the same
way wherever it appears (in any batch, order or process), and ``rate=0`` returns it unchanged.

Example:
    >>> corrupt = Corruption("junk", 0.5, seed=0)
    >>> corrupt("the cat sat on the mat") == corrupt("the cat sat on the mat")
    True
    >>> Corruption("char", 0.0)("unchanged")
    'unchanged'
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Iterable

KINDS = ("junk", "char")
_SYMBOL_JUNK = ("@@", "#$%", "~~~", "&&", "%%")


@dataclass(frozen=True)
class Corruption:
    """A seeded corruption transform: ``kind`` (``"junk"`` or ``"char"``) at ``rate`` in [0, 1]."""

    kind: str = "junk"
    rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"corruption kind={self.kind!r} is not valid; valid kinds: {', '.join(KINDS)}")
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"corruption rate={self.rate!r} is not valid; valid range: a number in [0, 1]")

    @property
    def tag(self) -> str:
        """A short name for file names and cache keys, e.g. ``"junk0.1s0"``."""
        return f"{self.kind}{self.rate:g}s{self.seed}"

    def _rng(self, text: str) -> random.Random:
        digest = hashlib.blake2b(f"{self.kind}:{self.seed}:{text}".encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "little"))

    def __call__(self, text: str) -> str:
        if self.rate == 0.0:
            return text
        rng = self._rng(text)
        return _junk(text, self.rate, rng) if self.kind == "junk" else _char(text, self.rate, rng)

    def apply(self, texts: Iterable[str]) -> list[str]:
        return [self(t) for t in texts]


def _junk_token(rng: random.Random) -> str:
    if rng.random() < 0.75:
        return rng.choice(string.ascii_uppercase) * rng.randint(2, 4)
    return rng.choice(_SYMBOL_JUNK)


def _junk(text: str, rate: float, rng: random.Random) -> str:
    out: list[str] = []
    for word in text.split(" "):
        out.append(word)
        if rng.random() < rate:
            out.append(_junk_token(rng))
    return " ".join(out)


def _char(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if rng.random() >= rate:
            out.append(c)
        else:
            edit = rng.randrange(4)
            if edit == 1:  # replace
                out.append(rng.choice(string.ascii_lowercase))
            elif edit == 2:  # duplicate
                out.extend((c, c))
            elif edit == 3 and i + 1 < len(chars):  # swap with the next character
                out.extend((chars[i + 1], c))
                i += 1
            # edit 0 (or a swap at the end): delete
        i += 1
    return "".join(out)


def parse_corruption(spec: str | None) -> Corruption | None:
    """Parse ``"junk:0.1"``, ``"char:0.05:3"`` (kind, rate, optional seed); None/"" -> None.

    Example:
        >>> parse_corruption("char:0.05:3")
        Corruption(kind='char', rate=0.05, seed=3)
    """
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"corruption={spec!r} is not valid; expected KIND:RATE[:SEED] with KIND in {', '.join(KINDS)}")
    try:
        rate = float(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ValueError(f"corruption={spec!r} is not valid; RATE must be a number in [0, 1] and SEED an integer") from None
    return Corruption(parts[0], rate, seed)
