"""tools/rank_experiment.py on a tiny model: every plot, table and number of the report is written."""

from __future__ import annotations

import json

from tools import rank_experiment


def test_report_has_every_plot_and_number(tiny_checkpoints, tmp_path, calib_text):
    out = tmp_path / "report"
    argv = ["--model", str(tiny_checkpoints["llama"]), "--out", str(out), "--sparsity", "0.7", "0.5",
            "--calib", str(calib_text), "--data", str(calib_text),
            "--runs", "sparsegpt:uniform", "sparsegpt:score", "wanda:owl", "sparsegpt:score@relative,per-type,pruned",
            "--nsamples", "2", "--seqlen", "32",
            "--windows", "2"]
    rank_experiment.main(argv)
    for name in ("scores_by_type.png", "ranking_vs_order.png", "perplexity.png", "allocation_heatmaps.png",
                 "results.md"):
        assert (out / name).stat().st_size > 1000, name
    report = json.loads((out / "results.json").read_text())
    variant = "score-relative-per-type-pruned"
    assert [(r["sparsity"], r["method"], r["allocation"]) for r in report["runs"]] == [
        (0.5, "sparsegpt", "uniform"), (0.5, "sparsegpt", "score"), (0.5, "wanda", "owl"), (0.5, "sparsegpt", variant),
        (0.7, "sparsegpt", "uniform"), (0.7, "sparsegpt", "score"), (0.7, "wanda", "owl"), (0.7, "sparsegpt", variant),
    ]
    variant_run = next(r for r in report["runs"] if r["allocation"] == variant)
    assert "--score-estimate relative --score-clusters per-type" in variant_run["compress_command"]
    assert "scores-pruned-0.5" in variant_run["compress_command"]
    assert all(r["ppl"] > 1 and r["compress_command"].startswith("python main.py compress") for r in report["runs"])
    assert report["dense"]["ppl"] > 1
    assert set(report["scores"]["targets"]) == {"0.5", "0.7"}
    table = (out / "results.md").read_text()
    assert "| sparsegpt | score |" in table and "python main.py scores" in table and "beat uniform" in table

    # a second invocation reuses everything: no run is redone, the report is the same
    first = {r["name"]: r["ppl"] for r in report["runs"]}
    rank_experiment.main(argv)
    again = json.loads((out / "results.json").read_text())
    assert {r["name"]: r["ppl"] for r in again["runs"]} == first
    assert [r["eval_seconds"] for r in again["runs"]] == [r["eval_seconds"] for r in report["runs"]]
