"""One-call router patching, end to end.

The default model is ``demo``, the demo model shipped with the package (no download); pass a
local folder or a Hub id instead, or ``--tiny`` for a small random OLMoE built on the spot.

    python examples/one_call.py
    python examples/one_call.py --tiny
    python examples/one_call.py --model allenai/OLMoE-1B-7B-0924
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

import hf_moe_patch as hmp
from hf_moe_patch.hub_access import locate_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="'demo' (the shipped demo model, default), a local folder or a Hub id")
    parser.add_argument("--tiny", action="store_true", help="use a locally built tiny OLMoE (no download)")
    args = parser.parse_args()

    if args.tiny:
        from hf_moe_patch.testing import tiny_model

        model = tiny_model("olmoe")
        inputs = {"input_ids": torch.randint(3, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    else:
        path, extra = locate_model(args.model)  # "demo" is the shipped model; a missing folder says so
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = hmp.from_pretrained(path, dtype="auto", **extra).eval()
        inputs = tokenizer(["Mixture of experts, routed globally."], return_tensors="pt")

    with torch.no_grad():
        native = model(**inputs).logits

        hmp.patch(model, "usmoe", top_k=model.config.num_experts_per_tok * 0.75, alpha=0.5)
        print("patched:", hmp.routing_config(model))
        with hmp.collect_stats(model) as stats:
            usmoe = model(**inputs).logits
        print("experts per token:", round(stats.summary()["experts_per_token_mean"], 3))
        print("max |logit change|:", float((usmoe - native).abs().max()))

        hmp.unpatch(model)
        print("unpatched, bit-for-bit native again:", torch.equal(model(**inputs).logits, native))

        with hmp.patched(model, "ssr", inference="sinkhorn"), hmp.collect_stats(model) as stats:
            model(**inputs)
        print("SSR plan at inference, MaxVio top-1:", round(stats.summary()["maxvio_top1"], 3))


if __name__ == "__main__":
    main()
