"""MoEE embeddings (hf_moe_patch.embeddings.moee) on tiny real models, with a small real word-level tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mteb.models.model_meta import ScoringFunction
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import hf_moe_patch as hmp
from hf_moe_patch.families import family_of
from hf_moe_patch.embeddings.moee import (
    EMBEDDINGS,
    MoEEncoder,
    format_prompt,
    moee_sum_similarity,
    routing_tag,
    standardize_per_batch,
    to_sentence_transformer,
)
from hf_moe_patch.patching import find_sites
from hf_moe_patch.testing import tiny_model

WORDS = (
    "this sentence means in one word instruct query retrieve semantically similar text a the cat dog sat "
    "on mat rug lay ran fast slow red blue green house tree river bird sang song morning evening quiet loud "
    "children played park rain fell city lights bright dark old new small big man woman book read table "
    "is was and of to with under over near far happy sad"
).split()
PUNCT = list(':".,\'?!')

TEXTS = [
    "A cat sat on the mat.",
    "The dog ran.",
    "Children played in the park with a red ball near the old river and the big tree.",
    "Rain fell.",
    "A bird sang a quiet song in the morning.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (vocab < 128, lower-cased, punctuation split) that adds a BOS token."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *PUNCT, *WORDS])}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def encoder_for(family: str, tokenizer, method: str | None = None, **kwargs) -> MoEEncoder:
    model = tiny_model(family)
    if method is not None:
        hmp.patch(model, method)
    kwargs.setdefault("progress", False)
    return MoEEncoder(model, tokenizer, **kwargs)


def reference_parts(model, tokenizer, text: str, prompt: str = "prompteol") -> tuple[np.ndarray, np.ndarray]:
    """hs / rw of one text from an unpadded single-sequence forward of the full causal LM."""
    ids = torch.tensor([tokenizer(format_prompt(text, prompt))["input_ids"]])
    logits = []
    handles = [s.router.register_forward_hook(lambda m, a, out: logits.append(out[0][-1].detach().clone()))
               for s in find_sites(model, family_of(model))]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states[-1][0, -1].numpy(), torch.cat(logits).numpy()


# --- shapes, meaning -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_parts_are_last_token_hidden_state_and_router_logits(family, tokenizer):
    enc = encoder_for(family, tokenizer, batch_size=8)
    parts = enc.embed_parts(TEXTS)  # one left-padded batch of texts of different lengths
    n_sites = len(find_sites(enc.model, family_of(enc.model)))
    assert parts["hs"].shape == (len(TEXTS), 32) and parts["rw"].shape == (len(TEXTS), n_sites * 8)
    for i, text in enumerate(TEXTS):
        hs, rw = reference_parts(enc.model, tokenizer, text)
        np.testing.assert_allclose(parts["hs"][i], hs, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(parts["rw"][i], rw, atol=1e-5, rtol=1e-4)
    # Router logits of the hooked gate modules themselves (not via find_sites) agree as well.
    gate = "router" if family == "gpt_oss" else "gate"
    seen = []
    h = getattr(enc.model.model.layers[1].mlp, gate).register_forward_hook(lambda m, a, o: seen.append(o[0][-1]))
    with torch.no_grad():
        enc.model(input_ids=torch.tensor([tokenizer(enc.format_text(TEXTS[2]))["input_ids"]]))
    h.remove()
    np.testing.assert_allclose(parts["rw"][2, 8:16], seen[0].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("embedding,width", [("hs", 32), ("rw", 16), ("moee_concat", 48), ("moee_sum", 48)])
def test_embedding_shapes_and_meta(embedding, width, tokenizer):
    enc = encoder_for("olmoe", tokenizer, embedding=embedding)
    out = enc.embed(TEXTS[:3])
    assert out.shape == (3, width) and out.dtype == np.float32 and np.isfinite(out).all()
    assert enc.embed_dim == width
    meta = enc.mteb_model_meta
    assert meta.name == f"hf_moe_patch/olmoe__{embedding}__native"
    assert meta.embed_dim == width and meta.n_parameters == sum(p.numel() for p in enc.model.parameters())
    assert meta.similarity_fn_name is (ScoringFunction.DOT_PRODUCT if embedding == "moee_sum" else ScoringFunction.COSINE)
    # The meta follows the routing: patch after construction.
    hmp.patch(enc.model, "usmoe", top_k=1.5)
    assert enc.mteb_model_meta.name == f"hf_moe_patch/olmoe__{embedding}__usmoe-top_k=1.5"
    assert routing_tag(enc.model) == "usmoe-top_k=1.5"


def test_modes_are_built_from_the_parts(tokenizer):
    model = tiny_model("qwen2_moe")
    parts = MoEEncoder(model, tokenizer, progress=False).embed_parts(TEXTS)
    hs, rw = parts["hs"].astype(np.float64), parts["rw"].astype(np.float64)

    def z(x):
        return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)

    concat = MoEEncoder(model, tokenizer, embedding="moee_concat", progress=False).embed(TEXTS)
    np.testing.assert_allclose(concat, np.hstack([z(hs), z(rw)]), atol=1e-5)
    np.testing.assert_allclose(concat[:, :32].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(concat[:, 32:].std(1), 1, atol=1e-4)
    w = 0.7
    summed = MoEEncoder(model, tokenizer, embedding="moee_sum", sum_weight=w, progress=False).embed(TEXTS)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(summed, np.hstack([unit(hs), math.sqrt(w) * unit(rw)]), atol=1e-6)
    np.testing.assert_allclose(MoEEncoder(model, tokenizer, embedding="hs", progress=False).embed(TEXTS), hs, atol=1e-6)
    np.testing.assert_allclose(MoEEncoder(model, tokenizer, embedding="rw", progress=False).embed(TEXTS), rw, atol=1e-6)


# --- independence from batch-mates and padding ----------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("method", [None, "usmoe", "expert_choice"])
def test_embedding_does_not_depend_on_batch_mates(family, method, tokenizer):
    enc = encoder_for(family, tokenizer, method, embedding="moee_concat", batch_size=16)
    target = TEXTS[0]
    alone = enc.embed_parts([target])
    longer = enc.embed_parts([TEXTS[2], target, TEXTS[4]])  # padded on the left here
    shorter = enc.embed_parts([TEXTS[1], TEXTS[3], target])  # the longest of its batch
    for key in ("hs", "rw"):
        np.testing.assert_allclose(longer[key][1], alone[key][0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(shorter[key][2], alone[key][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(enc.embed([TEXTS[2], target])[1], enc.embed([target])[0], atol=1e-5)
    # Small batches (sorted by length) give the same as one big batch, in input order.
    np.testing.assert_allclose(enc.embed(TEXTS, batch_size=2), enc.embed(TEXTS), atol=1e-5)


def test_left_padding_with_mask_positions(tokenizer):
    """The decoder stack gets the mask and positions counted from each row's first real token.

    (With RoPE, which all supported families use, a constant position shift leaves attention
    unchanged, so the independence test above cannot see wrong positions: check them directly.)
    """
    enc = encoder_for("olmoe", tokenizer)
    seen = {}
    handle = enc.model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        enc.embed([TEXTS[1], TEXTS[0]])
    finally:
        handle.remove()
    n0, n1 = (len(tokenizer(enc.format_text(t))["input_ids"]) for t in (TEXTS[0], TEXTS[1]))
    width = max(n0, n1)
    mask, pos, ids = seen["attention_mask"], seen["position_ids"], seen["input_ids"]
    assert mask.tolist() == [[1] * n0, [0] * (width - n1) + [1] * n1]  # sorted longest first, left-padded
    assert pos.tolist() == [list(range(n0)), [0] * (width - n1) + list(range(n1))]
    assert ids[1, : width - n1].tolist() == [tokenizer.pad_token_id] * (width - n1)


def test_independence_check_can_fail(tokenizer):
    """Batch-scoped routing (a user's choice) does make embeddings batch-dependent: the check sees it."""
    enc = encoder_for("olmoe", tokenizer, embedding="rw")
    hmp.patch(enc.model, "usmoe", scope="batch", top_k=1.0)
    alone = enc.embed([TEXTS[0]])[0]
    in_batch = enc.embed([TEXTS[2], TEXTS[0]])[1]
    assert not np.allclose(in_batch, alone, atol=1e-5)


def test_batch_standardisation_is_the_reference_and_batch_dependent(tokenizer):
    model = tiny_model("olmoe")
    parts = MoEEncoder(model, tokenizer, progress=False).embed_parts(TEXTS[:3])
    enc = MoEEncoder(model, tokenizer, embedding="moee_concat", standardize="batch", progress=False)
    out = enc.embed(TEXTS[:3], batch_size=3)
    hs, rw = torch.tensor(parts["hs"]), torch.tensor(parts["rw"])
    ref = [(x - x.mean(0)) / (x.std(0) + 1e-8) for x in (hs, rw)]
    np.testing.assert_allclose(out, torch.cat(ref, 1).numpy(), atol=1e-4)
    assert not np.allclose(enc.embed(TEXTS[:2], batch_size=2)[0], out[0], atol=1e-3)
    assert torch.equal(standardize_per_batch(torch.ones(1, 3)), torch.zeros(1, 3))


# --- similarity ------------------------------------------------------------------------------


def test_moee_sum_similarity_by_hand(tokenizer):
    w = 0.5
    enc = encoder_for("mixtral", tokenizer, embedding="moee_sum", sum_weight=w)
    emb = enc.embed(TEXTS)
    parts = enc.embed_parts(TEXTS)
    hs, rw = parts["hs"].astype(np.float64), parts["rw"].astype(np.float64)
    cos = lambda a, b: a @ b.T / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))  # noqa: E731
    expected = cos(hs, hs) + w * cos(rw, rw)

    full = enc.similarity(emb, emb)
    assert isinstance(full, torch.Tensor) and full.shape == (5, 5)
    np.testing.assert_allclose(full.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(full.numpy(), emb @ emb.T, atol=1e-5)  # the dot product is the score
    raw = np.hstack([parts["hs"], parts["rw"]])  # raw [hs ; rw] rows give the same scores
    np.testing.assert_allclose(enc.similarity(torch.tensor(raw), raw).numpy(), expected, atol=1e-5)
    # 1-D inputs (summarization): one row.
    one = enc.similarity(emb[1], emb[3])
    assert isinstance(one, torch.Tensor) and one.shape == (1, 1)
    assert float(one) == pytest.approx(expected[1, 3], abs=1e-5)
    assert enc.similarity(emb[1], emb).shape == (1, 5)
    pair = enc.similarity_pairwise(emb[:4], emb[1:])
    assert isinstance(pair, torch.Tensor) and pair.shape == (4,)
    np.testing.assert_allclose(pair.numpy(), np.diag(expected[:4, 1:]), atol=1e-5)
    assert float(enc.similarity_pairwise(emb[0], emb[2])) == pytest.approx(expected[0, 2], abs=1e-5)
    # The standalone function with another weight, and plain cosine for the other modes.
    np.testing.assert_allclose(moee_sum_similarity(raw, raw, 32, 2.0).numpy(), cos(hs, hs) + 2.0 * cos(rw, rw), atol=1e-5)
    hs_enc = MoEEncoder(enc.model, tokenizer, embedding="hs", progress=False)
    np.testing.assert_allclose(hs_enc.similarity(parts["hs"], parts["hs"]).numpy(), cos(hs, hs), atol=1e-5)
    np.testing.assert_allclose(hs_enc.similarity_pairwise(parts["hs"], parts["hs"]).numpy(), np.ones(5), atol=1e-5)


# --- prompts and instructions ----------------------------------------------------------------


def test_prompt_templates_and_instructions(tokenizer):
    assert format_prompt("A b.", "none") == '"A b."'
    assert format_prompt("A b.", "prompteol") == 'This sentence : "A b." means in one word:"'
    assert format_prompt("A b.", "none", "Find it.") == 'Instruct: Find it.\nQuery: "A b."'
    assert format_prompt('say "hi"', "none", clean=True) == "\"say 'hi'\""
    assert format_prompt("no dot", "none", clean=True) == '"no dot."' 
    enc = encoder_for("olmoe", tokenizer, prompt="none", instruction="Retrieve semantically similar text.")
    assert enc.format_text("A cat.") == '"A cat."'
    expected = tokenizer('Instruct: Retrieve semantically similar text.\nQuery: "A cat."')["input_ids"]
    assert enc.tokenize(["A cat."], enc._resolve(None)) == [expected]
    # The instruction reaches the model: embeddings differ with and without it.
    assert not np.allclose(enc.embed(["A cat."]), enc.embed(["A cat."], instruction=""), atol=1e-4)


def test_truncation_keeps_the_template_ending(tokenizer):
    enc = encoder_for("olmoe", tokenizer, max_length=16)
    ending = tokenizer('" means in one word:"', add_special_tokens=False)["input_ids"]
    full = tokenizer(enc.format_text(TEXTS[2]))["input_ids"]
    (ids,) = enc.tokenize([TEXTS[2]])
    assert len(full) > 16 and len(ids) == 16 and len(ending) == 7
    assert ids == full[: 16 - len(ending)] + ending and ids[0] == tokenizer.bos_token_id
    assert enc.embed([TEXTS[2]]).shape == (1, 48)


def test_bad_options_are_named(tokenizer):
    model = tiny_model("olmoe")
    for option, value, valid in [("embedding", "moe", "'moee_sum'"), ("prompt", "eol", "'prompteol'"), ("standardize", "rows", "'text'")]:
        with pytest.raises(ValueError) as err:
            MoEEncoder(model, tokenizer, **{option: value})
        assert option in str(err.value) and repr(value) in str(err.value) and valid in str(err.value)
    with pytest.raises(ValueError, match="sum_weight"):
        MoEEncoder(model, tokenizer, sum_weight=-1.0)
    with pytest.raises(ValueError, match="prompt='x'"):
        format_prompt("a", "x")
    assert set(EMBEDDINGS) == {"hs", "rw", "moee_concat", "moee_sum"}


# --- mteb ------------------------------------------------------------------------------------


def tiny_sts_task():
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    pairs = [
        ("A cat sat on the mat.", "A cat sat on the rug.", 4.5),
        ("The dog ran fast.", "The dog ran slow.", 3.0),
        ("Rain fell on the city.", "A bird sang a song.", 0.5),
        ("Children played in the park.", "Children played near the river.", 3.5),
        ("The old man read a book.", "The old woman read a book.", 4.0),
        ("Bright lights of the city.", "Dark evening in the park.", 1.0),
        ("A small red house.", "A big blue house.", 2.5),
        ("The tree was green.", "The river was quiet.", 1.5),
    ]

    class TinyMoEESTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="TinyMoEESTS",
            description="Eight hand-written English sentence pairs for testing MoEE.",
            reference=None,
            dataset={"path": "local/tiny-moee-sts", "revision": "1"},
            type="STS",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="cosine_spearman",
            date=("2025-01-01", "2025-01-02"),
            domains=["Written"],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="expert-annotated",
            dialect=[],
            sample_creation="created",
            bibtex_citation="",
        )

        def load_data(self, **kwargs) -> None:
            s1, s2, score = zip(*pairs)
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentence1": list(s1), "sentence2": list(s2), "score": list(score)})})
            self.data_loaded = True

    return TinyMoEESTS(), pairs


class CountingEncoder(MoEEncoder):
    """Counts calls of the model-defined similarity (the real computation runs)."""

    pairwise_calls = 0

    def similarity_pairwise(self, embeddings1, embeddings2):
        type(self).pairwise_calls += 1
        return super().similarity_pairwise(embeddings1, embeddings2)


def test_mteb_evaluation_uses_the_moee_sum_similarity(tokenizer, tmp_path):
    import mteb
    from scipy.stats import pearsonr, spearmanr

    task, pairs = tiny_sts_task()
    model = tiny_model("olmoe")
    hmp.patch(model, "usmoe")
    enc = CountingEncoder(model, tokenizer, embedding="moee_sum", sum_weight=0.5, instruction="task", progress=False)
    assert enc.task_instruction(task.metadata, None) == "Retrieve semantically similar text."
    result = mteb.evaluate(enc, [task], cache=mteb.ResultCache(tmp_path), overwrite_strategy="always")
    scores = result.task_results[0].scores["test"][0]
    assert CountingEncoder.pairwise_calls >= 1
    for key in ("spearman", "pearson", "cosine_spearman", "cosine_pearson", "main_score"):
        assert math.isfinite(scores[key]), key
    # mteb's "spearman" is the model similarity's: recompute it by hand from the embeddings.
    s1, s2, gold = zip(*pairs)
    instr = "Retrieve semantically similar text."
    e1, e2 = enc.embed(list(s1), instruction=instr), enc.embed(list(s2), instruction=instr)
    parts1, parts2 = enc.embed_parts(list(s1), instruction=instr), enc.embed_parts(list(s2), instruction=instr)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    by_hand = (unit(parts1["hs"]) * unit(parts2["hs"])).sum(1) + 0.5 * (unit(parts1["rw"]) * unit(parts2["rw"])).sum(1)
    np.testing.assert_allclose(enc.similarity_pairwise(e1, e2).numpy(), by_hand, atol=1e-5)
    assert scores["spearman"] == pytest.approx(spearmanr(gold, by_hand).statistic, abs=1e-6)
    assert scores["pearson"] == pytest.approx(pearsonr(gold, by_hand).statistic, abs=1e-5)
    # The moee_sum vectors' cosine is score / (1 + w): the cosine main score ranks the same way.
    assert scores["cosine_spearman"] == pytest.approx(scores["spearman"], abs=1e-6)
    assert result.task_results[0].task_name == "TinyMoEESTS"
    assert list(tmp_path.rglob("TinyMoEESTS.json"))


# --- sentence-transformers -------------------------------------------------------------------


@pytest.mark.parametrize("embedding", ["moee_sum", "moee_concat", "hs"])
def test_sentence_transformer_gives_the_same_vectors(embedding, tokenizer):
    enc = encoder_for("qwen3_moe", tokenizer, "expert_choice", embedding=embedding, sum_weight=0.25)
    st = to_sentence_transformer(enc)
    texts = TEXTS[:4]
    st_vectors = st.encode(texts, batch_size=2)
    np.testing.assert_allclose(st_vectors, enc.embed(texts), atol=1e-5)
    assert st.similarity_fn_name == ("dot" if embedding == "moee_sum" else "cosine")
    np.testing.assert_allclose(st.similarity(st_vectors, st_vectors).numpy(), enc.similarity(st_vectors, st_vectors).numpy(), atol=1e-5)
    assert st.get_embedding_dimension() == enc.embed_dim


def test_sentence_transformer_save_and_load(tokenizer, tmp_path):
    from sentence_transformers import SentenceTransformer

    enc = encoder_for("olmoe", tokenizer, "usmoe", embedding="moee_sum", prompt="none", sum_weight=2.0)
    st = to_sentence_transformer(enc)
    st.save(str(tmp_path / "st"))
    # The module class comes from the installed hf_moe_patch, which sentence-transformers only imports
    # for a saved model when allowed to.
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True, trust_remote_code=True)
    module = loaded[0]
    assert module.encoder.embedding == "moee_sum" and module.encoder.prompt == "none" and module.encoder.sum_weight == 2.0
    assert hmp.routing_config(module.encoder.model)["method"] == "usmoe"
    np.testing.assert_allclose(loaded.encode(TEXTS), enc.embed(TEXTS), atol=1e-5)


def test_from_pretrained_names_the_shipped_demo_model_and_missing_folders():
    enc = MoEEncoder.from_pretrained("demo", device="cpu", dtype=torch.float32, embedding="hs", progress=False)
    assert enc.model.config.model_type == "olmoe"
    assert enc.mteb_model_meta.name == "hf_moe_patch/demo-olmoe-wordnet__hs__native"  # the name the mteb runner gives it
    vectors = enc.embed(["A cat sat on the mat.", "The dog ran."])
    assert vectors.shape == (2, enc.embed_dim) and np.isfinite(vectors).all()
    with pytest.raises(FileNotFoundError, match="no such folder: './no/such/model'"):
        MoEEncoder.from_pretrained("./no/such/model")
