"""Alpaca SFT data (hf_moe_patch.training.data): templates, loss masks, truncation, corruption,
packing, splits, local loading and the WordNet-Alpaca set, on the WordNet fixture and the shipped
demo tokenizer (a real byte-level BPE tokenizer that pads on the left)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset

from hf_moe_patch.data.corruption import Corruption
from hf_moe_patch.lm import demo_model_path
from hf_moe_patch.training import data as D
from hf_moe_patch.training.data import (
    IGNORE_INDEX,
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    AlpacaFormatError,
    format_prompt,
    load_alpaca,
    make_collator,
    pack_examples,
    split_train_validation,
    tokenize_alpaca,
    wordnet_alpaca,
    write_jsonl,
)
from hf_moe_patch.data.wordnet import POS_NAMES, load_wordnet, split_of

WORDNET_FIXTURE = Path(__file__).parent / "fixtures" / "wordnet"
EXAMPLES = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
    {"instruction": "Define the word in the input.", "input": "dog",
     "output": "A member of the genus Canis that has been domesticated by man."},
    {"instruction": "Translate to French: good morning", "input": "   ", "output": "bonjour"},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def wn():
    return load_wordnet(WORDNET_FIXTURE)


@pytest.fixture(scope="module")
def wn_set(wn):
    return wordnet_alpaca(wn, n=None, seed=0, split="all")


def decode(tok, ids) -> str:
    return tok.decode(list(ids), clean_up_tokenization_spaces=False)


def prompt_length(tok, example) -> int:
    return len(tok(format_prompt(example))["input_ids"])


# ---------------------------------------------------------------------------------- templates


def test_templates_are_the_stanford_alpaca_strings():
    assert PROMPT_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    assert PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert format_prompt(EXAMPLES[0]) == PROMPT_NO_INPUT.format(instruction=EXAMPLES[0]["instruction"])
    assert format_prompt(EXAMPLES[1]) == PROMPT_INPUT.format(instruction="Define the word in the input.", input="dog")
    assert format_prompt(EXAMPLES[2]) == PROMPT_NO_INPUT.format(instruction=EXAMPLES[2]["instruction"])  # blank input
    assert format_prompt({"instruction": "x", "input": None}) == PROMPT_NO_INPUT.format(instruction="x")
    assert format_prompt({"instruction": "x"}) == PROMPT_NO_INPUT.format(instruction="x")


# ------------------------------------------------------------------------------- tokenisation


def test_labels_are_masked_exactly_on_the_prompt_and_the_response_ends_with_eos(tok, wn_set):
    sample = wn_set.select(range(60))
    assert {bool(x.strip()) for x in sample["input"]} == {True, False}  # both templates used
    plain = datasets.concatenate_datasets([Dataset.from_list(EXAMPLES), sample.select_columns(["instruction", "input", "output"])])
    tokenized = tokenize_alpaca(plain, tok, max_length=512)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert tok.padding_side == "left"  # untouched
    for example, row in zip(plain, tokenized):
        n = prompt_length(tok, example)
        ids, labels = row["input_ids"], row["labels"]
        assert ids[:n] == tok(format_prompt(example))["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
        assert row["attention_mask"] == [1] * len(ids)
        assert decode(tok, labels[n:]) == example["output"] + tok.eos_token
        assert decode(tok, ids[:n]) == tok.bos_token + format_prompt(example)


def test_add_eos_false_and_empty_outputs(tok, caplog):
    ds = Dataset.from_list([{"instruction": "a", "input": "", "output": "b c"}, {"instruction": "a", "input": "", "output": ""}])
    with caplog.at_level(logging.WARNING, logger="hf_moe_patch.training.data"):
        no_eos = tokenize_alpaca(ds, tok, add_eos=False)
    assert len(no_eos) == 1 and decode(tok, [t for t in no_eos[0]["labels"] if t != IGNORE_INDEX]) == "b c"
    assert "dropped 1 of 2" in caplog.text
    with_eos = tokenize_alpaca(ds, tok)  # an empty output still teaches to stop
    assert len(with_eos) == 2 and [t for t in with_eos[1]["labels"] if t != IGNORE_INDEX] == [tok.eos_token_id]


def test_truncation_keeps_the_prompt_and_some_response(tok, caplog):
    long_output = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    example = {"instruction": "Write a long text.", "input": "", "output": long_output}
    n = prompt_length(tok, example)
    # The prompt fits with room for min_response_tokens (16): the response's end is cut.
    row = tokenize_alpaca(Dataset.from_list([example]), tok, max_length=n + 20)[0]
    assert len(row["input_ids"]) == n + 20
    assert row["input_ids"][:n] == tok(format_prompt(example))["input_ids"]
    assert row["labels"][:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in row["labels"][n:]
    assert long_output.startswith(decode(tok, row["labels"][n:]))

    # The prompt is too long: its middle is cut, its start and the Response header stay.
    long_input = {"instruction": "Summarise the input.", "input": " ".join(["word"] * 400), "output": "A word repeated."}
    response = tok(long_input["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with caplog.at_level(logging.INFO, logger="hf_moe_patch.training.data"):
        cut = tokenize_alpaca(Dataset.from_list([long_input]), tok, max_length=64)[0]
    assert "1 with the prompt cut" in caplog.text
    assert len(cut["input_ids"]) == 64
    assert cut["input_ids"][-len(response):] == response
    assert cut["labels"][-len(response):] == response
    assert cut["labels"][: 64 - len(response)] == [IGNORE_INDEX] * (64 - len(response))
    text = decode(tok, cut["input_ids"][: 64 - len(response)])
    assert text.startswith(tok.bos_token + "Below is an instruction that describes a task, paired with an input")
    assert text.endswith("\n\n### Response:\n")

    # A long prompt and a long response: min_response_tokens response tokens survive.
    both = {**long_input, "output": long_output}
    row = tokenize_alpaca(Dataset.from_list([both]), tok, max_length=64, min_response_tokens=16)[0]
    assert len(row["input_ids"]) == 64 and sum(t != IGNORE_INDEX for t in row["labels"]) == 16

    # No room for the template at all: dropped, and said so.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_moe_patch.training.data"):
        assert len(tokenize_alpaca(Dataset.from_list([long_input, example]), tok, max_length=8)) == 0
    assert "dropped 2 of 2" in caplog.text


def test_corruption_changes_only_the_example_texts_and_is_deterministic(tok):
    corrupt = Corruption("junk", 0.5, seed=3)
    plain = Dataset.from_list(EXAMPLES)
    noisy = tokenize_alpaca(plain, tok, corruption=corrupt)
    again = tokenize_alpaca(plain, tok, corruption=Corruption("junk", 0.5, seed=3))
    assert noisy[:]["input_ids"] == again[:]["input_ids"]
    assert noisy[:]["input_ids"] != tokenize_alpaca(plain, tok)[:]["input_ids"]
    for example, row in zip(EXAMPLES, noisy):
        expected = {
            "instruction": corrupt(example["instruction"]),
            # A blank input stays blank: the no-input template is kept.
            "input": corrupt(example["input"]) if example["input"].strip() else "",
        }
        n = prompt_length(tok, expected)
        assert decode(tok, row["input_ids"][:n]) == tok.bos_token + format_prompt(expected)
        assert decode(tok, row["labels"][n:]) == corrupt(example["output"]) + tok.eos_token
        assert row["labels"][:n] == [IGNORE_INDEX] * n
    # The template itself is never corrupted, the texts are.
    prompt = decode(tok, noisy[1]["input_ids"])
    for frame in ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n",
                  "\n\n### Input:\n", "\n\n### Response:\n"):
        assert frame in prompt
    assert corrupt(EXAMPLES[1]["instruction"]) != EXAMPLES[1]["instruction"]
    # Only the fields asked for.
    prompt_only = tokenize_alpaca(plain, tok, corruption=corrupt, corrupt_fields=("instruction", "input"))
    for example, row in zip(EXAMPLES, prompt_only):
        assert decode(tok, [t for t in row["labels"] if t != IGNORE_INDEX]) == example["output"] + tok.eos_token
    with pytest.raises(ValueError, match="corrupt_fields"):
        tokenize_alpaca(plain, tok, corruption=corrupt, corrupt_fields=("text",))


# ------------------------------------------------------------------------- packing and splits


def test_packing_preserves_every_token_and_label_in_full_blocks(tok, wn_set):
    tokenized = tokenize_alpaca(wn_set.select(range(40)), tok)
    ids = [t for row in tokenized[:]["input_ids"] for t in row]
    labels = [t for row in tokenized[:]["labels"] for t in row]
    for block_size in (32, 97):
        packed = pack_examples(tokenized, block_size)
        sizes = [len(row) for row in packed[:]["input_ids"]]
        assert sizes[:-1] == [block_size] * (len(sizes) - 1) and 0 < sizes[-1] <= block_size
        assert len(sizes) == -(-len(ids) // block_size)
        assert [t for row in packed[:]["input_ids"] for t in row] == ids
        assert [t for row in packed[:]["labels"] for t in row] == labels
        assert all(row == [1] * len(row) for row in packed[:]["attention_mask"])
        dropped = pack_examples(tokenized, block_size, drop_last=True)
        assert {len(row) for row in dropped[:]["input_ids"]} == {block_size}
        assert len(dropped) == len(ids) // block_size
    # Example boundaries inside a block: EOS then BOS, and each label kept as it was.
    assert labels.count(tok.eos_token_id) == len(tokenized)
    with pytest.raises(ValueError, match="tokenized"):
        pack_examples(wn_set, 16)


def test_split_sizes_determinism_and_disjointness():
    ds = Dataset.from_dict({"x": list(range(100))})
    train, val = split_train_validation(ds, 0.1, seed=0)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(train[:]["x"] + val[:]["x"]) == list(range(100))
    again = split_train_validation(ds, 0.1, seed=0)
    assert again[1][:]["x"] == val[:]["x"] and again[0][:]["x"] == train[:]["x"]
    assert split_train_validation(ds, 0.1, seed=1)[1][:]["x"] != val[:]["x"]
    train, val = split_train_validation(ds, 7, seed=0)
    assert (len(train), len(val)) == (93, 7)
    assert split_train_validation(ds, 7.0, seed=0)[1][:]["x"] == val[:]["x"]
    train, val = split_train_validation(ds, 0, seed=0)
    assert (len(train), len(val)) == (100, 0)
    for bad in (1.5, -0.1, 100, -1, True, "0.1"):
        with pytest.raises(ValueError, match="validation_size"):
            split_train_validation(ds, bad)


# ------------------------------------------------------------------------------------ loading


def test_local_jsonl_json_parquet_and_folder_round_trip(tmp_path, wn):
    original = wordnet_alpaca(wn, n=40, seed=1)
    three = original.select_columns(["instruction", "input", "output"])
    cache = str(tmp_path / "cache")

    jsonl = write_jsonl(original, tmp_path / "out" / "wordnet.jsonl")
    assert len(jsonl.read_text(encoding="utf-8").splitlines()) == 40
    loaded = load_alpaca(jsonl, cache_dir=cache)
    assert loaded.column_names == ["instruction", "input", "output"]
    assert loaded.to_list() == three.to_list()
    assert load_alpaca(str(jsonl), split="train[:5]", cache_dir=cache).to_list() == three.to_list()[:5]

    # Stanford's alpaca_data.json: one JSON list; the Hub set's extra "text" column is dropped.
    records = [{**row, "text": "ignored"} for row in three.to_list()]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    assert load_alpaca(tmp_path / "alpaca_data.json", cache_dir=cache).to_list() == three.to_list()

    folder = tmp_path / "parquet"
    folder.mkdir()
    original.to_parquet(str(folder / "train.parquet"))
    assert load_alpaca(folder / "train.parquet", cache_dir=cache).to_list() == three.to_list()
    assert load_alpaca(folder, cache_dir=cache).to_list() == three.to_list()

    # No input column at all: empty inputs.
    write_jsonl([{"instruction": "a", "output": "b"}], tmp_path / "noinput.jsonl")
    assert load_alpaca(tmp_path / "noinput.jsonl", cache_dir=cache).to_list() == [{"instruction": "a", "input": "", "output": "b"}]


def test_missing_columns_and_bad_sources_are_clear_errors(tmp_path):
    write_jsonl([{"prompt": "a", "response": "b", "input": ""}], tmp_path / "chat.jsonl")
    with pytest.raises(AlpacaFormatError) as info:
        load_alpaca(tmp_path / "chat.jsonl", cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "lacks the columns 'instruction', 'output'" in message
    assert "'prompt', 'response', 'input'" in message and "Alpaca format" in message
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_alpaca(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):
        load_alpaca("no/such/file.json")
    (tmp_path / "data.csv").write_text("instruction,output\na,b\n")
    with pytest.raises(ValueError, match=r"\.json, \.jsonl or \.parquet"):
        load_alpaca(tmp_path / "data.csv")
    with pytest.raises(AlpacaFormatError, match="'output'"):
        tokenize_alpaca(Dataset.from_dict({"instruction": ["a"]}), None)


def test_hub_ids_go_through_datasets_load_dataset(monkeypatch):
    calls = []
    hub = Dataset.from_list([{**row, "text": "full text"} for row in EXAMPLES])

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if path == "offline/set":
            raise ConnectionError("Couldn't reach the Hub")
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_alpaca("tatsu-lab/alpaca", split="train[:3]", revision="abc123")
    assert calls == [("tatsu-lab/alpaca", {"split": "train[:3]", "revision": "abc123"})]
    assert loaded.column_names == ["instruction", "input", "output"] and loaded.to_list() == EXAMPLES
    with pytest.raises(ConnectionError) as info:
        load_alpaca("offline/set")
    assert any("Hub data set id" in note and "'wordnet'" in note for note in info.value.__notes__)


def test_load_alpaca_wordnet_is_the_builtin_set(wn):
    ds = load_alpaca("wordnet", wordnet=wn, n=30, seed=2)
    assert ds.column_names == ["instruction", "input", "output"]
    assert ds.to_list() == wordnet_alpaca(wn, n=30, seed=2).select_columns(["instruction", "input", "output"]).to_list()
    assert len(load_alpaca("wordnet", split="heldout", wordnet=wn, n=10)) == 10
    with pytest.raises(ValueError, match="split='validation'"):
        load_alpaca("wordnet", split="validation", wordnet=wn)


# ----------------------------------------------------------------------------- WordNet-Alpaca


def _word(row) -> str:
    if row["task"] == "word_for_definition":
        return row["output"].split(", ")[0]
    quoted = re.search(r'"(.+)"', row["instruction"])
    return quoted.group(1) if quoted else row["input"]


def test_wordnet_alpaca_is_deterministic_and_seeded(wn):
    a = wordnet_alpaca(wn, n=200, seed=0)
    assert a.to_list() == wordnet_alpaca(load_wordnet(WORDNET_FIXTURE), n=200, seed=0).to_list()
    b = wordnet_alpaca(wn, n=200, seed=1)
    assert a.to_list() != b.to_list()
    assert set(a["synset"]) != set(b["synset"])  # a different draw, not only another order
    assert wordnet_alpaca(wn, n=0).to_list() == []


def test_wordnet_alpaca_does_not_depend_on_pythonhashseed(wn):
    code = ("import json; from hf_moe_patch.training.data import wordnet_alpaca; "
            f"print(json.dumps(wordnet_alpaca({str(WORDNET_FIXTURE)!r}, n=80, seed=5).to_list()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == wordnet_alpaca(wn, n=80, seed=5).to_list()


def test_wordnet_alpaca_facts_are_true(wn, wn_set):
    senses = {}
    for s in wn:
        for lemma in set(s.lemmas):
            senses[lemma.lower()] = senses.get(lemma.lower(), 0) + 1
    assert set(wn_set["task"]) == set(D.WORDNET_TASKS)
    assert {bool(x) for x in wn_set["input"]} == {True, False}
    for row in wn_set:
        synset = wn[row["synset"]]
        word = _word(row)
        assert word in synset.lemmas
        task, output = row["task"], row["output"]
        if task != "word_for_definition":
            assert senses[word.lower()] == 1  # monosemous: one right answer
            assert (row["input"] == word) != (f'"{word}"' in row["instruction"])
        if task == "define":
            gloss = synset.definition[0].upper() + synset.definition[1:]
            assert output == (gloss if gloss.endswith(".") else gloss + ".")
        elif task == "use_in_sentence":
            assert any(output.lower().rstrip(".") == e.lower().rstrip(".") for e in synset.examples)
            assert word.lower() in output.lower()
        elif task == "part_of_speech":
            assert output == f'The word "{word}" is {"an" if synset.pos in "ar" else "a"} {POS_NAMES[synset.pos]}.'
        elif task == "hypernym":
            parent = re.search(r'"([^"]+)"\.$', output).group(1)
            assert parent in wn[synset.hypernyms[0]].lemmas
        else:
            assert row["input"] == synset.definition and output == ", ".join(synset.lemmas)
    # Checked against the database file itself, not through the reader.
    line = next(l for l in (WORDNET_FIXTURE / "data.noun").read_text().splitlines() if l.startswith("00002308 "))
    assert "| a tangible and visible entity; an entity that can cast a shadow;" in line
    rows = [r for r in wn_set if r["task"] == "define" and r["synset"] == "n00002308"]
    assert rows and rows[0]["output"] == "A tangible and visible entity; an entity that can cast a shadow."
    assert _word(rows[0]) in ("object", "physical object")


def test_wordnet_alpaca_splits_sizes_and_task_shares(wn, caplog):
    train = wordnet_alpaca(wn, n=None, split="train")
    heldout = wordnet_alpaca(wn, n=None, split="heldout")
    assert all(split_of(wn[s]) == "train" for s in train["synset"])
    assert all(split_of(wn[s]) == "heldout" for s in heldout["synset"])
    assert len(train) + len(heldout) == len(wordnet_alpaca(wn, n=None, split="all"))
    small = wordnet_alpaca(wn, n=100, seed=0)
    assert len(small) == 100
    counts = {t: list(small["task"]).count(t) for t in D.WORDNET_TASKS}
    assert counts == {t: 20 for t in D.WORDNET_TASKS}  # equal shares while every task has enough
    assert list(small["task"][:10]) != list(D.WORDNET_TASKS) * 2  # shuffled, not left in round-robin order
    pos = [o.rsplit(" ", 1)[-1] for o, t in zip(small["output"], small["task"]) if t == "part_of_speech"]
    assert pos.count("noun.") <= 8 and len(set(pos)) >= 3  # nouns do not take all the part-of-speech questions
    with caplog.at_level(logging.WARNING, logger="hf_moe_patch.training.data"):
        assert len(wordnet_alpaca(wn, n=10**6)) == len(train)
    assert "only" in caplog.text
    only = wordnet_alpaca(wn, n=10, tasks=["define"], input_fraction=0.0)
    assert set(only["task"]) == {"define"} and set(only["input"]) == {""}
    for bad in (dict(split="test"), dict(tasks=["rhymes"]), dict(n=-1), dict(input_fraction=2.0)):
        with pytest.raises(ValueError):
            wordnet_alpaca(wn, **bad)


# ---------------------------------------------------------------------------------- collating


def test_collator_pads_right_even_for_a_left_padding_tokenizer(tok, wn_set):
    assert tok.padding_side == "left"
    tokenized = tokenize_alpaca(wn_set.select(range(4)), tok)
    rows = list(tokenized)
    batch = make_collator(tok)(rows)
    assert tok.padding_side == "left"
    length = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, length)
    assert batch["input_ids"].dtype == torch.long
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
    assert make_collator(tok, pad_to_multiple_of=64)(rows)["input_ids"].shape[1] % 64 == 0

    # Right padding changes nothing for the real tokens: the same logits and loss as one by one.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_path()).float().eval()
    with torch.no_grad():
        out = model(**batch)
        total, count = 0.0, 0
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            single = model(**make_collator(tok)([row]))
            torch.testing.assert_close(out.logits[i, :n], single.logits[0], atol=1e-4, rtol=1e-4)
            tokens = sum(t != IGNORE_INDEX for t in row["labels"][1:])
            total, count = total + single.loss.item() * tokens, count + tokens
    assert out.loss.item() == pytest.approx(total / count, rel=1e-4)


def test_collator_on_packed_blocks_and_without_pad_token(tok, wn_set):
    packed = pack_examples(tokenize_alpaca(wn_set.select(range(10)), tok), 48)
    batch = make_collator(tok)(list(packed.select([0, len(packed) - 1])))
    assert batch["input_ids"].shape == (2, 48)

    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    padded = make_collator(NoPad())([{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7], "labels": [7]}])
    assert padded["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert padded["labels"].tolist() == [[-100, 6, 2], [7, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
