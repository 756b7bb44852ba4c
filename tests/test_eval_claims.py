"""eval/claims.py collates the experiments' own verdicts into eval/README.md's claims block."""

from __future__ import annotations

import json

from conftest import load_eval_script


def test_claims_block_lists_each_experiment_verdict_and_replaces_itself(tmp_path):
    pretrain, claims = load_eval_script("pretrain"), load_eval_script("claims")
    results = tmp_path / "results"
    assert pretrain.main(["--quick", "--routers", "topk_aux", "ssr_p0.1", "--seeds", "0", "1", "--out",
                          str(results / "pretrain"), "--log-level", "WARNING"]) == 0
    readme = tmp_path / "README.md"
    readme.write_text("# eval\n\nintro kept\n")
    assert claims.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    measured = json.loads((results / "pretrain" / "results.json").read_text())["claims"]
    for c in measured:
        row = next(line for line in text.splitlines() if line.startswith(f"| {c['claim']} | pretrain |"))
        assert row.endswith(f"| {c['paired_seeds']} | **{c['verdict']}** |")
    assert "avoids representation collapse | - | not measured" in text
    assert "Not run yet (no results.json): `moee_embeddings`, `robustness`, `dynamic_compute`." in text
    assert claims.main(["--results", str(results), "--readme", str(readme)]) == 0
    again = readme.read_text()
    assert again == text and again.count(claims.BEGIN) == 1 and again.startswith("# eval\n\nintro kept\n")
