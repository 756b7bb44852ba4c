"""Alpaca-format instruction data for supervised fine-tuning (SFT) of patched MoE models.

The pieces, in the order a run uses them::

    raw = load_alpaca("tatsu-lab/alpaca")                 # or a local .json/.jsonl/.parquet, or "wordnet"
    train, val = split_train_validation(raw, 0.05, seed=0)
    train = tokenize_alpaca(train, tokenizer, max_length=512)   # input_ids, attention_mask, labels
    train = pack_examples(train, block_size=512)                  # optional
    collator = make_collator(tokenizer)                           # right padding, labels padded by -100

**Format.** An example has ``instruction``, an optional ``input`` and ``output`` (the columns of
``tatsu-lab/alpaca`` and of Stanford Alpaca's ``alpaca_data.json``; any other column, such as the
Hub set's ``text``, is dropped). The prompt is one of the two Stanford Alpaca templates
(:data:`PROMPT_INPUT` when ``input`` is not blank, :data:`PROMPT_NO_INPUT` otherwise), copied
from ``tatsu-lab/stanford_alpaca``'s ``train.py``; the response is ``output`` followed by EOS.

**Loss on the response only.** ``labels`` are ``-100`` on every prompt token (BOS included) and
on padding, and equal ``input_ids`` on the response tokens and the closing EOS. The prompt and
the response are tokenized separately and their ids concatenated, so the prompt/response
boundary is exact whatever the tokenizer merges (the response is tokenized as a text of its own).

**Truncation** (``max_length``): the prompt is kept whole and the response's end is cut when that
leaves at least ``min(len(response), min_response_tokens)`` response tokens; otherwise the
prompt's middle is cut (its start and its closing ``### Response:`` header stay) to make that
room. An example left with no response token (an empty output without EOS, or a ``max_length``
too small for the header) is dropped; the numbers truncated and dropped are logged.

**Corruption** (``tokenize_alpaca(..., corruption=...)``, e.g. :class:`hf_moe_patch.data.corruption.
Corruption`): applied to the example's own texts (instruction, input and output by default; see
``corrupt_fields``) *before* they are put in the template, never to the template itself, so the
``### Instruction:``/``### Response:`` frame the model learns to follow stays intact. A blank
input is not corrupted (it would otherwise turn into junk and switch the template), and the
template is chosen from the original input.

**Packing** (:func:`pack_examples`): the tokenized examples are concatenated in order (each one
opened by the tokenizer's BOS if it adds one and closed by EOS) and the stream is cut into blocks
of ``block_size`` tokens, as ``run_clm``'s ``group_texts`` does; each token keeps its own label,
so the loss stays on response tokens only. Attention *does* cross example boundaries inside a
block (one causal mask per block, no position reset, no block-diagonal mask): the EOS/BOS
separators are what tells examples apart, as in common packing. An example may straddle two
blocks; the first token of every block is never a prediction target (causal LM shift).

**Padding** (:func:`make_collator`): batches are always padded on the *right*, whatever the
tokenizer's ``padding_side`` (the demo tokenizer pads on the left, which its embedding use
needs). Right padding keeps every example's positions ``0..L-1`` as without padding (transformers
causal LMs number positions from 0 regardless of the attention mask during training), and causal
attention means padded tail positions never influence the real ones.

**WordNet-Alpaca** (:func:`wordnet_alpaca`, ``load_alpaca("wordnet")``): a small, real,
deterministic instruction set built from WordNet (definitions, example sentences, parts of
speech, hypernyms, words for a definition), split like the demo model's pretraining corpus.

Example:
    >>> print(format_prompt({"instruction": "Define the word \\"dog\\".", "input": ""}), end="")
    Below is an instruction that describes a task. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Define the word "dog".
    <BLANKLINE>
    ### Response:
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # imported lazily: datasets and torch are heavy
    import datasets
    import torch

    from hf_moe_patch.data.wordnet import WordNet

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that transformers' causal-LM loss ignores (prompt tokens and padding)."""

# The two prompt templates of tatsu-lab/stanford_alpaca's train.py (PROMPT_DICT), verbatim.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_HEADER = "\n\n### Response:\n"
"""The end of both templates; kept when a too-long prompt is cut."""

ALPACA_COLUMNS = ("instruction", "input", "output")
REQUIRED_COLUMNS = ("instruction", "output")
LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
WORDNET_SOURCE = "wordnet"
EXPECTED_FORMAT = (
    "Alpaca format: one record per example with the string fields 'instruction', 'output' and "
    "optionally 'input' (e.g. {\"instruction\": \"Give three tips for staying healthy.\", "
    "\"input\": \"\", \"output\": \"1. Eat a balanced diet ...\"})"
)


class AlpacaFormatError(ValueError):
    """A data set is not in Alpaca format; the message names what is missing and the format."""


# --------------------------------------------------------------------------------------------
# Templates


def has_input(example: Mapping[str, Any]) -> bool:
    """Whether ``example`` takes the with-input template: its ``input`` is present and not blank.

    Example:
        >>> has_input({"instruction": "x", "input": "  "}), has_input({"instruction": "x", "input": "y"})
        (False, True)
    """
    value = example.get("input")
    return value is not None and str(value).strip() != ""


def format_prompt(example: Mapping[str, Any]) -> str:
    """The Stanford Alpaca prompt of ``example`` (everything before the response).

    Example:
        >>> print(format_prompt({"instruction": "Define the word in the input.", "input": "dog"}), end="")
        Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
        <BLANKLINE>
        ### Instruction:
        Define the word in the input.
        <BLANKLINE>
        ### Input:
        dog
        <BLANKLINE>
        ### Response:
        >>> format_prompt({"instruction": "Say hi.", "input": ""})[-50:]
        'request.\\n\\n### Instruction:\\nSay hi.\\n\\n### Response:\\n'
    """
    if has_input(example):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def format_example(example: Mapping[str, Any], eos_token: str = "") -> tuple[str, str]:
    """``(prompt, response)`` as texts: the response is ``output`` followed by ``eos_token``.

    Example:
        >>> prompt, response = format_example({"instruction": "Say hi.", "output": "Hi!"}, eos_token="</s>")
        >>> response
        'Hi!</s>'
    """
    return format_prompt(example), f"{example['output']}{eos_token}"


# --------------------------------------------------------------------------------------------
# Loading


def validate_alpaca(dataset: "datasets.Dataset", source: str = "the data set") -> "datasets.Dataset":
    """Check the Alpaca columns and return the data set with exactly ``instruction, input, output``.

    A missing ``input`` column becomes empty strings, missing (null) inputs become ``""``; other
    columns (``text`` in ``tatsu-lab/alpaca``) are dropped. Raises :class:`AlpacaFormatError`
    naming the missing columns and the expected format.

    Example:
        >>> from datasets import Dataset
        >>> validate_alpaca(Dataset.from_dict({"instruction": ["a"], "output": ["b"], "text": ["c"]}))[0]
        {'instruction': 'a', 'input': '', 'output': 'b'}
        >>> validate_alpaca(Dataset.from_dict({"prompt": ["a"], "output": ["b"]}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_moe_patch.training.data.AlpacaFormatError: the data set lacks the column 'instruction' (columns: 'prompt', 'output'); expected Alpaca format: ...
    """
    columns = list(dataset.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise AlpacaFormatError(
            f"{source} lacks the column{'s' if len(missing) > 1 else ''} {names} "
            f"(columns: {', '.join(repr(c) for c in columns)}); expected {EXPECTED_FORMAT}"
        )
    if "input" not in columns:
        dataset = dataset.add_column("input", [""] * len(dataset))
    dataset = dataset.select_columns(list(ALPACA_COLUMNS))
    if len(dataset) and any(v is None for v in dataset["input"]):
        dataset = dataset.map(lambda ex: {"input": ex["input"] or ""}, desc="empty inputs")
    return dataset


def _local_path(source: str | os.PathLike) -> Path | None:
    """``source`` as a local path when it names one (existing, or ending with a data extension)."""
    path = Path(source).expanduser()
    if isinstance(source, os.PathLike) or path.exists() or path.suffix.lower() in LOCAL_EXTENSIONS:
        if not path.exists():
            raise FileNotFoundError(f"no such data file or folder: {str(path)!r}")
        return path
    return None


def load_alpaca(
    source: str | os.PathLike,
    *,
    split: str = "train",
    revision: str | None = None,
    **kwargs: Any,
) -> "datasets.Dataset":
    """Load an Alpaca-format data set as a :class:`datasets.Dataset` with ``instruction, input, output``.

    ``source`` is one of:

    - ``"wordnet"``: the built-in WordNet-Alpaca set, ``wordnet_alpaca(split=split, **kwargs)``
      (``split`` is ``"train"``, ``"heldout"`` or ``"all"``; ``kwargs`` such as ``n``, ``seed``,
      ``wordnet``);
    - a local ``.json`` (a list of records, like Stanford's ``alpaca_data.json``, or JSON lines),
      ``.jsonl`` or ``.parquet`` file, or a folder of them (``datasets`` infers splits from the
      file names), read offline through ``datasets.load_dataset``;
    - otherwise a Hub data set id such as ``"tatsu-lab/alpaca"``, through
      ``datasets.load_dataset(source, split=split, revision=revision, **kwargs)`` (needs the
      Hub or the local ``datasets`` cache).

    ``split`` may slice (``"train[:1000]"``). Columns are checked by :func:`validate_alpaca`.

    Example:
        >>> ds = load_alpaca("tatsu-lab/alpaca")  # doctest: +SKIP
        >>> ds.column_names  # doctest: +SKIP
        ['instruction', 'input', 'output']
    """
    import datasets

    if isinstance(source, str) and source == WORDNET_SOURCE:
        if revision is not None:
            raise ValueError("revision= applies to Hub data sets, not to the built-in 'wordnet' set")
        return validate_alpaca(wordnet_alpaca(split=split, **kwargs), "WordNet-Alpaca")
    path = _local_path(source)
    if path is not None:
        if path.is_dir():
            dataset = datasets.load_dataset(str(path), split=split, revision=revision, **kwargs)
        else:
            builder = LOCAL_EXTENSIONS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"{str(path)!r} is not a supported data file; use .json, .jsonl or .parquet ({EXPECTED_FORMAT})"
                )
            dataset = datasets.load_dataset(builder, data_files=str(path), split=split, **kwargs)
        logger.info("loaded %d examples from %s", len(dataset), path)
        return validate_alpaca(dataset, repr(str(path)))
    try:
        dataset = datasets.load_dataset(str(source), split=split, revision=revision, **kwargs)
    except Exception as error:  # offline, unknown id, ...: say what source was understood as
        error.add_note(
            f"hf_moe_patch: {str(source)!r} is not a local .json/.jsonl/.parquet file or folder, so it was "
            f"loaded as a Hub data set id, which needs the Hub (or the datasets cache); use "
            f"'{WORDNET_SOURCE}' for the built-in offline set"
        )
        raise
    if isinstance(dataset, datasets.DatasetDict):  # split=None
        raise ValueError(f"{str(source)!r} gave several splits {sorted(dataset)}; pass split=")
    logger.info("loaded %d examples from %s (split %s)", len(dataset), source, split)
    return validate_alpaca(dataset, repr(str(source)))


def write_jsonl(dataset: "datasets.Dataset | Iterable[Mapping[str, Any]]", path: str | os.PathLike) -> Path:
    """Write ``dataset`` (a Dataset or dicts) as JSON lines, one example per line (UTF-8); the
    file loads back with ``load_alpaca(path)``. Creates the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in dataset:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
            count += 1
    logger.info("wrote %d examples to %s", count, path)
    return path


# --------------------------------------------------------------------------------------------
# WordNet-Alpaca

WORDNET_TASKS = ("define", "use_in_sentence", "part_of_speech", "hypernym", "word_for_definition")
WORDNET_SPLITS = ("train", "heldout", "all")
DEFAULT_WORDNET_SIZE = 2000


def _sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop (unless it ends with . ! or ?)."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _wordnet_candidates(wn: "WordNet", split: str) -> dict[str, list[dict[str, str]]]:
    """Every possible example of each task, as ``(instruction, input, output)`` variants, sorted."""
    from hf_moe_patch.data.wordnet import POS_NAMES, split_of

    senses = Counter(lemma.lower() for s in wn for lemma in set(s.lemmas))
    synsets = sorted((s for s in wn if split == "all" or split_of(s) == split), key=lambda s: s.id)
    out: dict[str, list[dict[str, Any]]] = {task: [] for task in WORDNET_TASKS}
    for s in synsets:
        # Monosemous lemmas only: each question then has one right answer in WordNet.
        words = sorted({lemma for lemma in s.lemmas if senses[lemma.lower()] == 1})
        for word in words:
            q = f'"{word}"'
            out["define"].append({
                "synset": s.id, "word": word, "output": _sentence(s.definition),
                "plain": (f"Define the word {q}.", ""), "with_input": ("Define the word in the input.", word),
            })
            example = next((e for e in s.examples if re.search(rf"\b{re.escape(word)}\b", e, re.IGNORECASE)), None)
            if example is not None:
                out["use_in_sentence"].append({
                    "synset": s.id, "word": word, "output": _sentence(example),
                    "plain": (f"Use the word {q} in a sentence.", ""),
                    "with_input": ("Use the word in the input in a sentence.", word),
                })
            pos = POS_NAMES[s.pos]
            out["part_of_speech"].append({
                "synset": s.id, "word": word, "output": f"The word {q} is {_article(pos)} {pos}.",
                "plain": (f"What part of speech is the word {q}?", ""),
                "with_input": ("What part of speech is the word in the input?", word),
            })
            parents = [h for h in s.hypernyms if h in wn.synsets]
            if parents and s.pos in ("n", "v"):
                parent = wn[parents[0]].lemmas[0]
                answer = f'{q} is a kind of "{parent}".' if s.pos == "n" else f'To {q} is a way to "{parent}".'
                out["hypernym"].append({
                    "synset": s.id, "word": word, "output": answer,
                    "plain": (f"What is the word {q} a kind of?", ""),
                    "with_input": ("What is the word in the input a kind of?", word),
                })
        if words and s.definition:
            out["word_for_definition"].append({
                "synset": s.id, "word": s.lemmas[0], "output": ", ".join(s.lemmas),
                "plain": None, "with_input": ("Which word has the definition given in the input?", s.definition),
            })
    return out


def _interleave(items: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Round robin over the groups of ``items`` (by ``key``, groups sorted), each group in its order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    ordered = [groups[k] for k in sorted(groups)]
    return [group[i] for i in range(max(map(len, ordered), default=0)) for group in ordered if i < len(group)]


def wordnet_alpaca(
    wordnet: "WordNet | str | os.PathLike | None" = None,
    *,
    n: int | None = DEFAULT_WORDNET_SIZE,
    seed: int = 0,
    split: str = "train",
    tasks: Sequence[str] = WORDNET_TASKS,
    input_fraction: float = 0.5,
) -> "datasets.Dataset":
    """A real Alpaca-format instruction set built from WordNet, small enough for a small model.

    Five tasks, each about one *monosemous* word (a lemma of exactly one synset in ``wordnet``, so
    every question has a single right answer), drawn in equal shares (round robin) then shuffled:

    - ``define``: ``Define the word "X".`` -> the synset's definition (capitalised, full stop);
    - ``use_in_sentence``: ``Use the word "X" in a sentence.`` -> a WordNet example sentence of
      that synset containing X;
    - ``part_of_speech``: ``What part of speech is the word "X"?`` -> ``The word "X" is a noun.``
      (the parts of speech in equal shares while they last, since nouns dominate WordNet);
    - ``hypernym`` (nouns, verbs): ``What is the word "X" a kind of?`` -> ``"X" is a kind of "Y".``
      (verbs: ``To "X" is a way to "Y".``), Y the first lemma of the first hypernym;
    - ``word_for_definition`` (always with input): ``Which word has the definition given in the
      input?`` + the definition -> the synset's lemmas (``dog, domestic dog, Canis familiaris``).

    The first four take, with probability ``input_fraction``, their with-input variant
    (``Define the word in the input.`` + input ``X``), so both Alpaca templates are used.

    ``split`` follows :func:`hf_moe_patch.data.wordnet.split_of`, as the demo model's pretraining
    corpus does: ``"train"`` uses the synsets whose glosses the demo model was pretrained on,
    ``"heldout"`` the others (words it never saw), ``"all"`` both. ``n`` caps the size
    (``None``: every candidate; fewer when the database has fewer, logged). Deterministic: the
    candidates are sorted and drawn with ``random.Random(f"wordnet-alpaca:{seed}")``, so the set
    depends on the database, the arguments and the seed only (not on ``PYTHONHASHSEED``).
    ``wordnet`` is a loaded :class:`~hf_moe_patch.data.wordnet.WordNet`, a folder, or ``None`` for the
    system's WordNet (see :func:`~hf_moe_patch.data.wordnet.load_wordnet`).

    Columns: ``instruction``, ``input``, ``output`` and, for analysis, ``task`` and ``synset``
    (the synset id the answer comes from).

    Example:
        >>> ds = wordnet_alpaca(n=100, seed=0)  # doctest: +SKIP
        >>> ds[0]  # doctest: +SKIP
        {'instruction': 'Define the word in the input.', 'input': 'bacteriolysis', 'output': 'Dissolution or destruction of bacteria.', 'task': 'define', 'synset': 'n13535693'}
    """
    import datasets

    from hf_moe_patch.data.wordnet import WordNet, load_wordnet

    if split not in WORDNET_SPLITS:
        raise ValueError(f"split={split!r} is not a WordNet-Alpaca split; valid: {', '.join(WORDNET_SPLITS)}")
    unknown = [t for t in tasks if t not in WORDNET_TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks={list(tasks)!r} is not valid; choose among {', '.join(WORDNET_TASKS)}")
    if n is not None and n < 0:
        raise ValueError(f"n={n!r} is not valid; a number of examples >= 0, or None for all")
    if not 0.0 <= input_fraction <= 1.0:
        raise ValueError(f"input_fraction={input_fraction!r} is not valid; a number in [0, 1]")
    wn = wordnet if isinstance(wordnet, WordNet) else load_wordnet(wordnet)
    candidates = _wordnet_candidates(wn, split)
    rng = random.Random(f"wordnet-alpaca:{seed}")
    pools = []
    for task in dict.fromkeys(tasks):  # unique, in the given order
        pool = list(candidates[task])
        rng.shuffle(pool)
        if task == "part_of_speech":  # equal shares of the parts of speech while they last (nouns dominate)
            pool = _interleave(pool, key=lambda item: item["synset"][0])
        pools.append((task, pool))
    total = sum(len(pool) for _, pool in pools)
    limit = total if n is None else min(n, total)
    if n is not None and n > total:
        logger.warning("WordNet-Alpaca: only %d examples available on split %r (asked for %d)", total, split, n)
    chosen: list[tuple[str, dict[str, Any]]] = []
    depth = 0
    while len(chosen) < limit:  # round robin over the tasks: equal shares while they last
        for task, pool in pools:
            if depth < len(pool) and len(chosen) < limit:
                chosen.append((task, pool[depth]))
        depth += 1
    rng.shuffle(chosen)
    rows: dict[str, list[str]] = {"instruction": [], "input": [], "output": [], "task": [], "synset": []}
    for task, item in chosen:
        use_input = item["plain"] is None or rng.random() < input_fraction
        instruction, text = item["with_input"] if use_input else item["plain"]
        for key, value in (("instruction", instruction), ("input", text), ("output", item["output"]),
                           ("task", task), ("synset", item["synset"])):
            rows[key].append(value)
    logger.info("WordNet-Alpaca: %d examples on split %r (%s)", limit, split,
                ", ".join(f"{t}: {c}" for t, c in Counter(rows["task"]).items()))
    features = datasets.Features({key: datasets.Value("string") for key in rows})
    return datasets.Dataset.from_dict(rows, features=features)


# --------------------------------------------------------------------------------------------
# Tokenisation


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def tokenize_alpaca(
    dataset: "datasets.Dataset",
    tokenizer,
    *,
    max_length: int = 512,
    corruption: Callable[[str], str] | None = None,
    add_eos: bool = True,
    corrupt_fields: Sequence[str] = ALPACA_COLUMNS,
    min_response_tokens: int = 16,
    num_proc: int | None = None,
) -> "datasets.Dataset":
    """Tokenize Alpaca examples for causal-LM SFT: columns ``input_ids``, ``attention_mask``, ``labels``.

    Each example is ``tokenizer(prompt)`` (with the tokenizer's special tokens, e.g. BOS) followed
    by ``tokenizer(output, add_special_tokens=False)`` and EOS (``add_eos``). ``labels`` are -100
    on the prompt and the ids themselves on the response and EOS; see the module docstring for
    truncation at ``max_length`` and dropped examples. ``corruption`` (a ``str -> str`` callable
    such as :class:`~hf_moe_patch.data.corruption.Corruption`) is applied to the example's
    ``corrupt_fields`` texts (default: instruction, input and output) before templating, never
    to the template; blank inputs are left blank. Every other column is removed.

    Example:
        >>> from datasets import Dataset
        >>> from transformers import AutoTokenizer
        >>> from hf_moe_patch.lm import demo_model_path
        >>> tok = AutoTokenizer.from_pretrained(demo_model_path())
        >>> ds = tokenize_alpaca(Dataset.from_dict({"instruction": ["Say hi."], "output": ["hi"]}), tok)
        >>> ex = ds[0]
        >>> tok.decode(ex["input_ids"]).endswith("### Response:\\nhi</s>")
        True
        >>> tok.decode([t for t in ex["labels"] if t != -100])
        'hi</s>'
    """
    import datasets

    if max_length < 2:
        raise ValueError(f"max_length={max_length!r} is not valid; at least 2 tokens")
    bad_fields = [f for f in corrupt_fields if f not in ALPACA_COLUMNS]
    if bad_fields:
        raise ValueError(f"corrupt_fields={list(corrupt_fields)!r} is not valid; "
                         f"choose among {', '.join(ALPACA_COLUMNS)}")
    dataset = validate_alpaca(dataset) if not set(ALPACA_COLUMNS) <= set(dataset.column_names) else dataset
    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set one or pass add_eos=False")
    header_len = len(_encode(tokenizer, [RESPONSE_HEADER], add_special_tokens=False)[0])
    special_prefix = len(_encode(tokenizer, [""], add_special_tokens=True)[0])  # e.g. BOS
    fields = tuple(corrupt_fields) if corruption is not None else ()

    def corrupt(text: Any, field: str) -> str:
        text = "" if text is None else str(text)
        return corruption(text) if field in fields and text.strip() else text

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts, responses = [], []
        for instruction, inp, output in zip(batch["instruction"], batch["input"], batch["output"]):
            example = {"instruction": corrupt(instruction, "instruction"), "output": corrupt(output, "output")}
            # The template follows the original input: corruption never adds or removes it.
            example["input"] = corrupt(inp, "input") if has_input({"input": inp}) else ""
            prompts.append(format_prompt(example))
            responses.append(example["output"])
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_cut": []}
        for prompt, response in zip(_encode(tokenizer, prompts, True), _encode(tokenizer, responses, False)):
            if add_eos:
                if len(prompt) > special_prefix and prompt[-1] == eos_id:
                    prompt = prompt[:-1]  # a tokenizer that closes every text with EOS: the prompt is not closed
                response = response + [eos_id]
            cut = 0
            reserve = min(len(response), min_response_tokens)
            if len(prompt) + reserve > max_length:  # cut the prompt's middle, keep start and header
                keep_tail = min(header_len, len(prompt))
                keep_head = max_length - reserve - keep_tail
                if keep_head < special_prefix + 1:
                    response = []  # no room for any prompt text before the header: drop
                else:
                    prompt = prompt[:keep_head] + prompt[len(prompt) - keep_tail:]
                    cut = 2
            if len(prompt) + len(response) > max_length:
                response = response[: max(max_length - len(prompt), 0)]
                cut = max(cut, 1)
            if not response:
                continue  # no response token left (or an empty output without EOS): nothing to learn
            out["input_ids"].append(prompt + response)
            out["attention_mask"].append([1] * (len(prompt) + len(response)))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + response)
            out["_cut"].append(cut)
        return out

    before = len(dataset)
    features = datasets.Features({
        "input_ids": _list_of(datasets.Value("int32")),
        "attention_mask": _list_of(datasets.Value("int8")),
        "labels": _list_of(datasets.Value("int32")),
        "_cut": datasets.Value("int8"),
    })
    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, features=features,
                            num_proc=num_proc, desc="tokenize Alpaca")
    cuts = Counter(tokenized["_cut"])
    tokenized = tokenized.remove_columns("_cut")
    dropped = before - len(tokenized)
    logger.info("tokenized %d examples (max_length %d): %d with the response cut, %d with the prompt cut, %d dropped",
                len(tokenized), max_length, cuts.get(1, 0), cuts.get(2, 0), dropped)
    if dropped:
        logger.warning("dropped %d of %d examples with no response token left within max_length=%d "
                       "(or an empty output)", dropped, before, max_length)
    return tokenized


def _list_of(value):
    """A list feature: ``datasets.List`` (datasets >= 4) or ``datasets.Sequence``."""
    import datasets

    return getattr(datasets, "List", datasets.Sequence)(value)


# --------------------------------------------------------------------------------------------
# Packing, splitting, collating


def pack_examples(dataset: "datasets.Dataset", block_size: int, *, drop_last: bool = False) -> "datasets.Dataset":
    """Concatenate tokenized examples (in order) and cut the stream into ``block_size`` blocks.

    Labels stay per token (prompt and padding -100, response tokens their ids). Attention crosses
    example boundaries within a block (plain concatenation with the EOS separators, no position
    reset). Every block has ``block_size`` tokens except the last, which keeps the remainder
    (padded by the collator) unless ``drop_last``. Columns: ``input_ids``, ``attention_mask``, ``labels``.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"input_ids": [[1, 5, 6, 2], [1, 7, 2]], "attention_mask": [[1] * 4, [1] * 3],
        ...                         "labels": [[-100, -100, 6, 2], [-100, 7, 2]]})
        >>> packed = pack_examples(ds, 3)
        >>> packed[:]["input_ids"], packed[:]["labels"]
        ([[1, 5, 6], [2, 1, 7], [2]], [[-100, -100, 6], [2, -100, 7], [2]])
    """
    import datasets

    if block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not valid; a number of tokens >= 1")
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"pack_examples needs tokenized examples (tokenize_alpaca); missing columns: {missing}")

    def pack(batch: dict[str, list]) -> dict[str, list]:
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        end = len(ids) - len(ids) % block_size if drop_last else len(ids)
        starts = range(0, end, block_size)
        return {
            "input_ids": [ids[i : i + block_size] for i in starts],
            "attention_mask": [[1] * len(ids[i : i + block_size]) for i in starts],
            "labels": [labels[i : i + block_size] for i in starts],
        }

    features = datasets.Features({
        "input_ids": _list_of(datasets.Value("int32")),
        "attention_mask": _list_of(datasets.Value("int8")),
        "labels": _list_of(datasets.Value("int32")),
    })
    # One batch over the whole set: no remainder per map batch, every block but the last is full.
    packed = dataset.map(pack, batched=True, batch_size=None, remove_columns=dataset.column_names,
                         features=features, desc="pack")
    logger.info("packed %d examples into %d blocks of %d tokens", len(dataset), len(packed), block_size)
    return packed


def split_train_validation(
    dataset: "datasets.Dataset", validation_size: float | int, seed: int = 0
) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """A seeded random split ``(train, validation)``: ``validation_size`` is a share in (0, 1) or a
    number of examples (0 gives an empty validation set). Same seed, same split.

    Example:
        >>> from datasets import Dataset
        >>> train, val = split_train_validation(Dataset.from_dict({"x": list(range(10))}), 0.2, seed=0)
        >>> len(train), len(val), sorted(train[:]["x"] + val[:]["x"]) == list(range(10))
        (8, 2, True)
    """
    size = len(dataset)
    invalid = (f"validation_size={validation_size!r} is not valid for {size} examples; "
               f"a share in (0, 1) or a count in [0, {max(size - 1, 0)}]")
    if isinstance(validation_size, bool) or not isinstance(validation_size, (int, float)):
        raise ValueError(invalid)
    if isinstance(validation_size, float) and not validation_size.is_integer():
        if not 0.0 < validation_size < 1.0:
            raise ValueError(invalid)
    else:
        validation_size = int(validation_size)
        if not 0 <= validation_size < max(size, 1):
            raise ValueError(invalid)
        if validation_size == 0:
            return dataset, dataset.select([])
    parts = dataset.train_test_split(test_size=validation_size, seed=seed, shuffle=True)
    logger.info("split %d examples: %d train, %d validation (seed %d)",
                size, len(parts["train"]), len(parts["test"]), seed)
    return parts["train"], parts["test"]


@dataclass
class SFTCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels`` (-100) on
    the right to the longest example of the batch (rounded up to ``pad_to_multiple_of``) and
    returns ``torch.long`` tensors. Other keys are ignored; a missing ``attention_mask`` is all ones."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        rows = [[int(t) for t in f["input_ids"]] for f in features]
        length = max((len(r) for r in rows), default=0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), self.label_pad_token_id, dtype=torch.long)
        has_labels = all("labels" in f for f in features)
        for i, (row, feature) in enumerate(zip(rows, features)):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            given = feature.get("attention_mask")
            mask[i, : len(row)] = torch.tensor([int(t) for t in given], dtype=torch.long) if given is not None else 1
            if has_labels:
                labels[i, : len(row)] = torch.tensor([int(t) for t in feature["labels"]], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if has_labels:
            batch["labels"] = labels
        return batch


def make_collator(tokenizer, *, pad_to_multiple_of: int | None = None) -> SFTCollator:
    """The SFT batch collator for ``tokenizer``: right padding (whatever ``tokenizer.padding_side``;
    the tokenizer is not modified) with its pad token, or EOS when it has none; labels padded by -100.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from hf_moe_patch.lm import demo_model_path
        >>> tok = AutoTokenizer.from_pretrained(demo_model_path())  # pads on the left
        >>> features = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
        >>> batch = make_collator(tok)(features)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[1, 5, 6], [1, 7, 0]], [[1, 1, 1], [1, 1, 0]], [[-100, 5, 6], [-100, 7, -100]])
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with; "
                             "set tokenizer.pad_token")
        logger.info("the tokenizer has no pad_token; padding with eos_token (id %d), masked out", pad)
    return SFTCollator(pad_token_id=int(pad), pad_to_multiple_of=pad_to_multiple_of)


__all__ = [
    "ALPACA_COLUMNS", "AlpacaFormatError", "DEFAULT_WORDNET_SIZE", "IGNORE_INDEX", "PROMPT_INPUT",
    "PROMPT_NO_INPUT", "SFTCollator", "WORDNET_TASKS", "format_example", "format_prompt", "has_input",
    "load_alpaca", "make_collator", "pack_examples", "split_train_validation", "tokenize_alpaca",
    "validate_alpaca", "wordnet_alpaca", "write_jsonl",
]
