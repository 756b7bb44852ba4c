"""A small reader for the WordNet 3.0 database files (Debian's ``wordnet-base``).

WordNet is the project's source of real English text offline: its glosses, example sentences,
lexicographer categories and hypernym hierarchy feed the demo model's pretraining corpus and the
local mteb tasks. Only the ``data.{noun,verb,adj,adv}`` files are read (format: ``wndb(5WN)``).

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Used under the WordNet
3.0 license (see ``/usr/share/doc/wordnet-base/copyright``).
"""

from __future__ import annotations

import os
import re
import zlib
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

ENV_VAR = "HF_MOE_PATCH_WORDNET"
DEFAULT_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/opt/homebrew/share/wordnet")
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}

# lexnames(5WN): the lexicographer file of each synset, by its two-digit number.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

INSTALL_HINT = (
    "WordNet 3.0 database files were not found. Install Debian's `wordnet-base` package "
    "(`sudo apt-get install wordnet-base`, files in /usr/share/wordnet), or point the "
    f"{ENV_VAR} environment variable (or the `path` argument) at a folder holding data.noun, "
    "data.verb, data.adj and data.adv."
)


class WordNetNotFoundError(FileNotFoundError):
    """The WordNet database files are missing; the message says how to install them."""


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    ``id`` is the part of speech followed by the 8-digit byte offset (``"n02084071"``);
    satellite adjectives have ``pos == "a"``. Lemmas use spaces, not underscores.
    """

    id: str
    pos: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    hypernyms: tuple[str, ...]

    @property
    def gloss(self) -> str:
        """The definition, the text the tasks call a gloss."""
        return self.definition


_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_QUOTED = re.compile(r'"([^"]+)"')


def parse_data_line(line: str) -> Synset:
    """Parse one synset line of a ``data.*`` file.

    Example:
        >>> s = parse_data_line('00217499 04 n 01 disaster 0 001 @ 00217014 n 0000 '
        ...                     '| an act that has disastrous consequences; "a real disaster"  ')
        >>> s.id, s.lexname, s.lemmas, s.definition, s.examples, s.hypernyms
        ('n00217499', 'noun.act', ('disaster',), 'an act that has disastrous consequences', ('a real disaster',), ('n00217014',))
    """
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
    pos = "a" if ss_type == "s" else ss_type
    w_cnt = int(fields[3], 16)
    words = fields[4 : 4 + 2 * w_cnt : 2]
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    at = 4 + 2 * w_cnt
    p_cnt = int(fields[at])
    hypernyms = []
    for i in range(p_cnt):
        symbol, target, target_pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
        if symbol in ("@", "@i"):
            hypernyms.append(("a" if target_pos == "s" else target_pos) + target)
    gloss = gloss.strip()
    first_quote = gloss.find('"')
    definition = gloss if first_quote < 0 else gloss[:first_quote]
    definition = definition.strip().rstrip(";").strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss[first_quote:])) if first_quote >= 0 else ()
    return Synset(pos + offset, pos, LEXNAMES[lex_filenum], lemmas, definition, examples, tuple(hypernyms))


def find_wordnet_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder with WordNet's ``data.*`` files: ``path``, else ``$HF_MOE_PATCH_WORDNET``, else
    the usual system locations. Raises :class:`WordNetNotFoundError` with install instructions."""
    candidates = [path] if path is not None else [os.environ.get(ENV_VAR), *DEFAULT_DIRS]
    for candidate in candidates:
        if candidate and all((Path(candidate) / f).is_file() for f in DATA_FILES.values()):
            return Path(candidate)
    where = f" (looked in {', '.join(str(c) for c in candidates if c)})"
    raise WordNetNotFoundError(INSTALL_HINT + where)


class WordNet:
    """The synsets of one WordNet database, with hypernym-based similarity.

    Example:
        >>> wn = load_wordnet()  # doctest: +SKIP
        >>> wn["n02084071"].lemmas  # doctest: +SKIP
        ('dog', 'domestic dog', 'Canis familiaris')
    """

    def __init__(self, synsets: dict[str, Synset], source: Path | None = None) -> None:
        self.synsets = synsets
        self.source = source
        self._depth: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.synsets)

    def __iter__(self) -> Iterator[Synset]:
        return iter(self.synsets.values())

    def __getitem__(self, synset_id: str) -> Synset:
        return self.synsets[synset_id]

    def max_depth(self, synset_id: str) -> int:
        """Length of the longest hypernym path to a root (a root has depth 0)."""
        if synset_id not in self._depth:
            # Iterative post-order walk: recursion would hit Python's limit on deep chains.
            stack = [synset_id]
            while stack:
                current = stack[-1]
                todo = [h for h in self.synsets[current].hypernyms if h not in self._depth]
                if todo:
                    stack.extend(todo)
                    continue
                stack.pop()
                parents = self.synsets[current].hypernyms
                self._depth[current] = 1 + max(self._depth[h] for h in parents) if parents else 0
        return self._depth[synset_id]

    def ancestors(self, synset_id: str) -> dict[str, int]:
        """Every hypernym ancestor (the synset itself included) with its shortest distance."""
        distance = {synset_id: 0}
        queue = deque([synset_id])
        while queue:
            current = queue.popleft()
            for parent in self.synsets[current].hypernyms:
                if parent not in distance:
                    distance[parent] = distance[current] + 1
                    queue.append(parent)
        return distance

    def wup_similarity(self, a: str, b: str) -> float | None:
        """Wu-Palmer similarity as NLTK defines it: ``2 d / (l_a + l_b)``, with ``d`` the depth
        (counted in nodes) of the deepest common hypernym and ``l_x = d + distance(x, lcs)``.
        ``None`` when the two synsets share no ancestor (different parts of speech or roots)."""
        up_a, up_b = self.ancestors(a), self.ancestors(b)
        common = up_a.keys() & up_b.keys()
        if not common:
            return None
        depth = max(self.max_depth(c) for c in common)
        lcs_candidates = [c for c in common if self.max_depth(c) == depth]
        depth += 1
        best = 0.0
        for lcs in lcs_candidates:
            best = max(best, 2.0 * depth / (up_a[lcs] + up_b[lcs] + 2 * depth))
        return best


def split_of(synset: Synset, heldout_fraction: float = 0.1, seed: int = 0) -> str:
    """``"heldout"`` or ``"train"``, decided by a stable hash of the synset's first lemma.

    Hashing the lemma (not the synset) keeps all senses of a word on one side, so the demo model
    never sees, during pretraining, any gloss or example of a word the evaluation tasks use.

    Example:
        >>> s = Synset("n1", "n", "noun.act", ("bank",), "d", (), ())
        >>> split_of(s) == split_of(Synset("n2", "n", "noun.object", ("bank", "x"), "e", (), ()))
        True
    """
    key = f"{seed}:{synset.lemmas[0].lower()}".encode()
    return "heldout" if zlib.crc32(key) % 10_000 < heldout_fraction * 10_000 else "train"


@lru_cache(maxsize=4)
def _load(directory: Path) -> WordNet:
    synsets: dict[str, Synset] = {}
    for name in DATA_FILES.values():
        with open(directory / name, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  "):  # the license header
                    continue
                synset = parse_data_line(line)
                synsets[synset.id] = synset
    return WordNet(synsets, source=directory)


def load_wordnet(path: str | os.PathLike | None = None) -> WordNet:
    """Read WordNet 3.0 from ``path`` (see :func:`find_wordnet_dir`); cached per folder."""
    return _load(find_wordnet_dir(path).resolve())
