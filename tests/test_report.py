"""`slotwise report` (components/report.py): the tables `make repro` ends with, on real and hand-made outputs."""
import json

from slotwise.components import report


def shown(capsys, runs) -> tuple[int, str]:
    code = report.main(["--runs", str(runs)])
    return code, " ".join(capsys.readouterr().out.split())  # one line: rich wraps long cells


def test_the_tiny_pipeline_run_is_reported_stage_by_stage(tiny_runs, capsys):
    runs = tiny_runs / "runs"
    code, out = shown(capsys, runs)
    assert code == 0
    retro = json.loads((runs / "retrofit/summary.json").read_text())
    assert f"{retro['memory_params']:,} new parameters beside {retro['base_params']:,}" in out
    manifest = json.loads((runs / "data/manifest.json").read_text())["datasets"]
    assert f"{manifest['facts']['count']} facts from triviaqa" in out
    assert f"tasks: triviaqa {manifest['tasks/triviaqa']['count']}, arc_easy {manifest['tasks/arc_easy']['count']}" in out
    heal = json.loads((runs / "train/summary.json").read_text())["memory"]
    assert f"held-out perplexity {heal['heldout_ppl_memory_on']:,.2f} with the memory, {heal['heldout_ppl_memory_off']:,.2f} without" in out
    layer = heal["layers"]["1"]
    assert f"layer 1 64 {100 * layer['coverage']:.1f}% {100 * layer['effective_slots']:.1f}% {100 * layer['read_df_fraction']:.1f}%" in out
    continual = json.loads((runs / "continual/summary.json").read_text())["runs"]
    for name, r in continual.items():
        assert f"{name} {name} {r['learned']} / 2" in out
    evaluate = json.loads((runs / "evaluate/results.json").read_text())
    assert f"arc_easy acc_norm {100 * evaluate['arc_easy']['acc_norm']:.1f}% 2" in out
    for png in ("continual/plots/curves.png", "continual/plots/frontier.png", "evaluate/plots/scores.png",
                "slot_stats/plots/rank_frequency.png", "slot_stats/plots/df_hist.png"):
        assert str(runs / png) in out
    assert "dvc plots show" in out and "not run yet" not in out


def test_the_continual_table_from_hand_made_outputs(tmp_path, capsys):
    """The continual table and the matched-acquisition table show the numbers of the stage's files."""
    d = tmp_path / "runs" / "continual"
    d.mkdir(parents=True)
    start = {"known_found": 9, "known_screened": 150, "heldout_ppl": 14.39}
    runs = {"smf_tfidf": {"group": "smf_tfidf", "learned": 1, "n_facts": 100, "known_kept": 7, "heldout_ppl": 14.60, "heldout_ppl_rise": 0.0146},
            "full_ft@lr=1e-05": {"group": "full_ft", "learned": 26, "n_facts": 100, "known_kept": 6, "heldout_ppl": 15.64,
                                 "heldout_ppl_rise": 0.0869}}
    (d / "summary.json").write_text(json.dumps({"start": start, "runs": runs}))
    delta = {"rows_mean": 1297.0, "bytes_max": 3_500_000, "fraction_max": 0.0052}
    (d / "curves.json").write_text(json.dumps({"methods": {"smf_tfidf": {"delta_per_fact": delta}}}))
    (d / "frontier.json").write_text(json.dumps({
        "smf_tfidf": {"acquisition_range": [0.0, 0.05], "at": {"0.05": {"known_drop": 0.22, "heldout_ppl_rise": 0.0146}}},
        "full_ft": {"acquisition_range": [0.05, 0.26], "at": {"0.05": {"known_drop": None, "heldout_ppl_rise": 0.03}}}}))
    code, out = shown(capsys, tmp_path / "runs")
    assert code == 0
    assert "continual: 100 new facts, one at a time" in out
    assert "smf_tfidf smf_tfidf 1 / 100 7 / 9 14.60 (+1.5%) 1,297 rows, max 3.50 MB = 0.52%" in out
    assert "full_ft@lr=1e-05 full_ft 26 / 100 6 / 9 15.64 (+8.7%) -" in out
    assert "retention on 9 known facts (of 150 screened)" in out
    assert "method acquisition range at 5%" in out
    assert "smf_tfidf 0% - 5% 22% / +1.5%" in out and "full_ft 5% - 26% - / +3.0%" in out
    for stage in ("data", "retrofit", "train", "slot_stats", "evaluate"):
        assert f"{stage} not run yet" in out


def test_nothing_to_report(tmp_path, capsys):
    assert report.main(["--runs", str(tmp_path / "runs")]) == 1
    assert "no stage outputs under" in capsys.readouterr().out


def test_a_pretrained_memory_that_replaces_an_ffn_has_no_memory_off_perplexity(tmp_path, capsys):
    """Testbed pretraining (memory in place of an FFN) records heldout_ppl_memory_off: null; the report says why."""
    d = tmp_path / "runs" / "train"
    d.mkdir(parents=True)
    usage = {"n_slots": 65536, "coverage": 0.744, "effective_slots": 0.161, "read_df_fraction": 0.532, "median_df_fraction": 0.016}
    (d / "summary.json").write_text(json.dumps({"mode": "pretrain", "step": 700, "best_step": 700, "initial_eval_ppl": 4164.0,
                                                "best_eval_ppl": 511.25, "memory": {
        "heldout_ppl_memory_on": 511.25, "heldout_ppl_memory_off": None, "layers": {"3": usage}}}))
    code, out = shown(capsys, tmp_path / "runs")
    assert code == 0
    assert "held-out perplexity 511.25 with the memory, no model without it (the memory replaces an FFN)" in out
    assert "layer 3 65,536 74.4% 16.1% 53.2% 1.6%" in out
