"""A port of the official MoEE code (tianyi-lab/MoE-Embedding, commit f80bebd), for tests only.

Written from reading ``moee.py`` (``MOEE.encode``), ``eval_mteb.py`` (instruction formatting)
and the ensemble branches of its vendored mteb evaluators (STS, Classification, Clustering),
keeping their statements and order. What cannot run here is replaced by its transformers 5
equivalent: the official patched modeling files return each layer's router logits next to the
outputs; here ``output_router_logits=True`` gives the same logits (the gate's output). Nothing
from ``hf_moe_patch`` is used.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score
from sklearn.metrics.pairwise import paired_cosine_distances


def gritlm_instruction_format(instruction):
    return "<|user|>\n" + instruction + "\n<|embed|>\n" if instruction else "<|embed|>\n"


def eval_mteb_instruction(instruction):
    """eval_mteb.py: ``NAME_TO_FUNC[args.instruction_format](instruction.strip(": \\n"))``."""
    return gritlm_instruction_format(instruction.strip(": \n"))


TEMPLATES = {
    "prompteol": ["This sentence : \"*sent 0*\" means in one word:\""],
    "none": ["\"*sent 0*\""],
}


def official_prompts(sentences_batch, instruction, embed_method, embed_eos=""):
    """The text part of MOEE.encode for one batch."""
    sentences_batch = [instruction + s + embed_eos for s in sentences_batch]
    prompt_templates = TEMPLATES[embed_method]
    sentences_batch = [s.split(' ') for s in sentences_batch]
    prompts = []
    for sent in sentences_batch:
        sent = ' '.join(sent) if sent != [] else '.'
        if len(sent) > 0 and sent[-1] not in '.?!"\'':
            sent += '.'
        sent = sent.replace('"', '\'')
        for prompt in prompt_templates:
            prompts.append(prompt.replace('*sent 0*', sent).replace('_', ' ').strip())
    return prompts


@torch.no_grad()
def official_encode(model, tokenizer, sentences, *, batch_size, instruction="", emb_info="HS", embed_method="prompteol"):
    """MOEE.encode: returns (all_embeddings, all_default, all_moe_rw) as numpy arrays."""
    tokenizer.pad_token_id = 0
    tokenizer.padding_side = "left"
    all_embeddings, all_default, all_moe_rw = [], [], []
    for start_index in range(0, len(sentences), batch_size):
        prompts = official_prompts(sentences[start_index:start_index + batch_size], instruction, embed_method)
        prompts = tokenizer(prompts, padding=True, return_tensors="pt")
        outputs = model(**prompts, output_hidden_states=True, output_router_logits=True, return_dict=True)
        batch, width = prompts["input_ids"].shape
        # The official model returns sent_emb (B, layers, L, N): each layer's router logits.
        sent_emb = torch.stack([r.reshape(batch, width, -1) for r in outputs.router_logits], dim=1).float().cpu()
        lst_token_emb = outputs.hidden_states[-1][:, -1, :].float().cpu()
        lst_token_rw = sent_emb[:, :, -1, :]
        lst_token_rw = torch.cat([lst_token_rw[:, i, :] for i in range(lst_token_rw.shape[1])], dim=1)
        if emb_info == 'HS':
            embeddings = lst_token_emb
        elif emb_info == 'RW':
            embeddings = lst_token_rw
        elif emb_info == 'MoEE':
            embeddings = torch.cat([lst_token_emb, lst_token_rw], dim=1)
        if emb_info != 'HS':
            mean = embeddings.mean(dim=0, keepdim=True)
            std = embeddings.std(dim=0, keepdim=True)
            embeddings = (embeddings - mean) / (std + 1e-8)

            mean = lst_token_emb.mean(dim=0, keepdim=True)
            std = lst_token_emb.std(dim=0, keepdim=True)
            lst_token_emb = (lst_token_emb - mean) / (std + 1e-8)

            mean = lst_token_rw.mean(dim=0, keepdim=True)
            std = lst_token_rw.std(dim=0, keepdim=True)
            lst_token_rw = (lst_token_rw - mean) / (std + 1e-8)
        all_embeddings.append(embeddings.cpu().numpy())
        all_default.append(lst_token_emb.cpu().numpy())
        all_moe_rw.append(lst_token_rw.cpu().numpy())
    out = []
    for part in (all_embeddings, all_default, all_moe_rw):
        part = torch.from_numpy(np.concatenate(part, axis=0))
        out.append(torch.where(torch.isnan(part), torch.zeros_like(part), part).numpy())
    return tuple(out)


def official_sts_spearman(gold_scores, default1, default2, moe_rw1, moe_rw2, similarity_weights):
    """STSEvaluator with --similarity_ensemble: the cosine_spearman it reports."""
    cosine_scores_main = 1 - (paired_cosine_distances(default1, default2))
    cosine_scores_aux = 1 - (paired_cosine_distances(moe_rw1, moe_rw2))
    cosine_spearman, _ = spearmanr(gold_scores, [cosine_scores_main[i] + cosine_scores_aux[i] * similarity_weights
                                                 for i in range(len(cosine_scores_aux))])
    return cosine_spearman


def official_classification_accuracy(y_test, y_pred_main, y_pred_aux, similarity_weights):
    """ClassificationEvaluator with --similarity_ensemble: averaged predictions, then accuracy."""
    y_pred = (np.asarray(y_pred_main) + np.asarray(y_pred_aux) * similarity_weights) / (1 + similarity_weights)
    try:
        return accuracy_score(y_test, y_pred)
    except ValueError:
        y_pred = [int(i) for i in y_pred]
        return accuracy_score(y_test, y_pred)


def official_cluster_assignment(default_assignment, mow_rw_assignment, similarity_weights):
    """ClusteringEvaluator with --similarity_ensemble."""
    return (default_assignment + mow_rw_assignment * similarity_weights) / (1 + similarity_weights)
