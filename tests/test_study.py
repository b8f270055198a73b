import gzip
import json
import logging
import math
import shutil

import pytest

from scaleot_fed_cli.main import main

from .conftest import write_items

STUDY = """
[study]
out = "{out}"
results = "{results}"
model = "{model}"
tasks = ["piqa"]
seeds = [0, 1]
modes = ["lora"]
train_limit = 24
dev_items = 4
eval_limit = 6
eval_batch_size = 4
full_finetune_lrs = [1e-4, 1e-3]
attack_emulator = "scaleot"
attack_lrs = [1e-5, 1e-3]
resamples = 200

[finetune]
steps = 2
batch_size = 4
max_length = 64

[attack]
steps = 2
batch_size = 4

[layer_replace]
steps = 2
batch_size = 2
block_size = 16
harmonizer_rank = 4
ranking_candidates = 8
ranking_batches = 1

[distill]
steps = 2
batch_size = 2
block_size = 16

[[emulator]]
name = "ot-distilled"
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5
distill = true

[[emulator]]
name = "uniform"
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5

[[emulator]]
name = "scaleot"
method = "scaleot"
num_adapter_layers = 2
alpha = 0.5
rank_keep_ratio = 0.5

[[claim]]
claim = "plug-in beats the emulator fine-tuned"
a = "scaleot/plug_in"
b = "scaleot/emulator_finetune"

[[claim]]
claim = "plug-in is close to full fine-tuning"
a = "scaleot/plug_in"
b = "full_finetune"
kind = "close"
margin = 0.05
"""


def test_study_grid_over_seeds_with_sweeps_claims_and_per_item_files_resumes(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    results = tmp_path / "results"
    (tmp_path / "study.toml").write_text(STUDY.format(out=tmp_path / "study", results=results, model=tmp_path / "model"))
    # a plan lists every unit before anything ran (no rate yet, so no times) and writes nothing
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--plan"]) == 0
    planned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(planned) > 10 and all(line.endswith("M block-tokens") for line in planned)
    # one unit per row: the unseeded uniform drop's zero-shot once, though the grid has two seeds
    assert len(set(planned)) == len(planned) and sum("uniform zero-shot" in line for line in planned) == 1
    assert not (tmp_path / "study").exists() and not results.exists()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["n_eval"] == {"piqa": 6}
    # every claim decided from both seeds on both sides, its verdict following from its interval
    assert [c["claim"] for c in summary["claims"]] == ["plug-in beats the emulator fine-tuned",
                                                       "plug-in is close to full fine-tuning"]
    for c in summary["claims"]:
        assert c["seeds"] == [2, 2] and c["n"] == 6 and c["ci95"][0] <= c["difference"] <= c["ci95"][1]
        lo, hi = c["ci95"]
        if c["verdict"] == "holds":
            assert lo > 0 if c["kind"] == "greater" else (-0.05 < lo and hi < 0.05)
    rows = summary["rows"]
    # seeded emulators (stage 1, distillation) are built per seed; uniform drop once
    assert rows["scaleot/emulator_zero_shot"]["piqa"]["seeds"] == 2
    assert rows["uniform/emulator_zero_shot"]["piqa"]["seeds"] == 1
    # the sweeps: every rate at the first seed, the chosen one at the second
    sweeps = summary["sweeps"]
    assert [e["lr"] for e in sweeps["full_finetune"]["piqa"]] == [1e-4, 1e-3]
    chosen = sweeps["full_finetune"]["piqa chosen"]
    assert rows["full_finetune"]["piqa"]["rows"] == [f"full_finetune/lr{chosen:g}/seed{s}/row" for s in (0, 1)]
    # the strongest attacker by its dev loss, never by a score on the evaluation items
    strongest = min(sweeps["scaleot/attack"]["piqa"], key=lambda e: (e["best_dev_loss"], e["lr"]))["lr"]
    assert sweeps["scaleot/attack"]["piqa chosen"] == strongest
    # per-item files for every scored row, from which the row's accuracy is recomputed
    files = summary["items_files"]["piqa"]
    assert len(files) == len(list((tmp_path / "study" / "piqa" / "rows").glob("*.json")))
    record = json.loads(gzip.open(results / files["scaleot/seed1/plug_in"], "rt").read())
    correct = [max(range(len(s)), key=s.__getitem__) == g for s, g in zip(record["loglik"], record["gold"])]
    assert sum(correct) / len(correct) == record["acc"]
    stability = summary["stage1_stability"][0]
    assert stability["seeds"] == ["seed0", "seed1"] and set(stability["scores"]["overlap"]) == {"seed0-seed1"}
    assert summary["budgets"]["stage1"] and summary["budgets"]["distillation"]
    report = (results / "REPORT.md").read_text()
    assert "## Claims" in report and "plug-in beats the emulator fine-tuned" in report and "Stage 1 across seeds" in report
    assert (results / "rows.png").stat().st_size > 1000 and (results / "claims.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    assert "computing" not in capsys.readouterr().out
    # a row the run folder lost but the ledger holds: a resume restores it, so a plan counts it
    # done, restoring it in its scratch view only; a plan refuses what a resume would
    (tmp_path / "study" / "piqa" / "rows" / "full_zero_shot.json").unlink()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--plan"]) == 0
    assert "nothing left to run" in capsys.readouterr().out
    assert not (tmp_path / "study" / "piqa" / "rows" / "full_zero_shot.json").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a run")
    for args in (["--out", str(tmp_path / "foreign")], ["--overwrite"]):
        assert main(["study", "--config", str(tmp_path / "study.toml"), "--plan", *args]) == 2
    assert "holds no run of ours" in capsys.readouterr().err
    (results / "REPORT.md").unlink()  # the report alone, from the rows on disk
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--report-only"]) == 0
    assert (results / "REPORT.md").read_text() == report and "claims:" in capsys.readouterr().out
    # the ranking's settings may change on resume (saved stage-1 runs are re-ranked), but not
    # under emulators already built from the old ranking
    (tmp_path / "study.toml").write_text((tmp_path / "study.toml").read_text().replace("ranking_candidates = 8",
                                                                                      "ranking_candidates = 12"))
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 2
    assert "ranking_candidates changed, but" in capsys.readouterr().err
    # nor may a task's items change under its finished rows
    (tmp_path / "study.toml").write_text(STUDY.format(out=tmp_path / "study", results=results, model=tmp_path / "model")
                                         .replace("eval_limit = 6", "eval_limit = 6\nrandom_subsets = [\"piqa\"]"))
    for flag in ("--no-progress", "--plan"):  # a plan refuses what the study would
        assert main(["study", "--config", str(tmp_path / "study.toml"), flag]) == 2
        assert "the items of ['piqa'] changed" in capsys.readouterr().err
    # a fresh checkout: the run folder (weights, row caches) is gone, the committed results are
    # kept. The report comes from the ledger alone, and a rerun computes nothing: stage 1 is in
    # the ledger, its weights rebuilt only when an emulator needs them
    (tmp_path / "study.toml").write_text(STUDY.format(out=tmp_path / "study", results=results, model=tmp_path / "model"))
    shutil.rmtree(tmp_path / "study")
    (results / "REPORT.md").unlink()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--report-only"]) == 0
    assert (results / "REPORT.md").read_text() == report and not (tmp_path / "study").exists()
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "restored" in log and "computing" not in log and "stage 1 (" not in log
    again = json.loads((results / "summary.json").read_text())
    assert again["claims"] == summary["claims"] and again["rows"] == summary["rows"]
    # a cell whose plug-in row is lost runs again: its stage 1 and emulator rebuilt from the seed,
    # its rows scored as before
    lost = results / files["scaleot/seed1/plug_in"]
    before = {row: json.loads(gzip.open(results / files[f"scaleot/seed1/{row}"], "rt").read())
              for row in ("emulator_finetune", "plug_in")}
    lost.unlink()
    shutil.rmtree(tmp_path / "study")
    # the plan of a fresh checkout: the committed rows count as done, as a resume restores them
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--plan"]) == 0
    planned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(planned) == 1 and planned[0].startswith("  piqa: scaleot seed 1 fine-tune + plug-in: ")
    assert planned[0].endswith(" min") and not (tmp_path / "study").exists()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "stage 1 (2 steps) seed 1" in log and "computing scaleot/seed1/plug_in" in log
    assert log.count("computing") == 2  # the cell's two rows, nothing else
    for row, old in before.items():
        new = json.loads(gzip.open(results / files[f"scaleot/seed1/{row}"], "rt").read())
        assert new["acc"] == old["acc"] and new["gold"] == old["gold"]
        assert sum(new["loglik"], []) == pytest.approx(sum(old["loglik"], []), abs=1e-3)
    # the same on another machine, where stage 1 comes out different (its RL run diverged):
    # refused by default, naming the way on; with rebuilt_differently = "accept", the unit runs on
    # the new build, the old build's record is set aside with the rows made from it, the report says so
    record = results / "ledger" / "stage1" / "na2-a0.5" / "seed1.json"
    old_build = json.loads(record.read_text())
    record.write_text(json.dumps(old_build | {"rl_scores": {k: v + 1.0 for k, v in old_build["rl_scores"].items()}}))
    lost.unlink()
    shutil.rmtree(tmp_path / "study")
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 2
    assert 'rebuilt_differently = "accept"' in capsys.readouterr().err and lost.exists() is False
    (tmp_path / "study.toml").write_text(STUDY.format(out=tmp_path / "study", results=results, model=tmp_path / "model")
                                         .replace("eval_limit = 6", 'eval_limit = 6\nrebuilt_differently = "accept"'))
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "came out different when rebuilt" in log and log.count("computing") == 2 and lost.exists()
    kept = json.loads((results / "ledger" / "earlier_builds" / "stage1" / "na2-a0.5" / "seed1.build1.json").read_text())
    assert kept["rl_scores"] != old_build["rl_scores"]  # the (tampered) earlier build's record
    assert "items/piqa/scaleot__seed1__emulator_zero_shot.loglik.json.gz" in kept["rows_made"]
    assert not any("seed0" in r for r in kept["rows_made"]) and str(lost.relative_to(results)) not in kept["rows_made"]
    assert json.loads(record.read_text())["rl_scores"] == old_build["rl_scores"]  # the new build, recorded
    summary = json.loads((results / "summary.json").read_text())
    assert summary["earlier_builds"][0]["record"] == "earlier_builds/stage1/na2-a0.5/seed1.build1.json"
    assert "## Builds rebuilt differently" in (results / "REPORT.md").read_text()


def test_study_variant_emulator_must_exist(tmp_path):
    from recipes.study import load_study_config
    from scaleot_fed.errors import ConfigError

    (tmp_path / "s.toml").write_text('[study]\nvariant_emulator = "nope"\nvariant_modes = ["full"]\n'
                                     '[[emulator]]\nname = "u"\nmethod = "uniform-drop"\n')
    with pytest.raises(ConfigError, match="not one of"):
        load_study_config(tmp_path / "s.toml")


def test_a_claim_must_name_rows_of_the_grid_and_a_close_claim_a_margin(tmp_path):
    from recipes.study import load_study_config
    from scaleot_fed.errors import ConfigError

    head = '[study]\ntasks = ["piqa"]\n[[emulator]]\nname = "u"\nmethod = "uniform-drop"\n'
    (tmp_path / "s.toml").write_text(head + '[[claim]]\nclaim = "x"\na = "u/plug_in"\nb = "full_finetune"\n')
    with pytest.raises(ConfigError, match="names 'full_finetune', not a row of this grid"):
        load_study_config(tmp_path / "s.toml")  # no full_finetune_lrs: no full fine-tuning row
    (tmp_path / "s.toml").write_text(head + '[[claim]]\nclaim = "x"\na = "u/plug_in"\nb = "u/gap"\nkind = "close"\n')
    with pytest.raises(ConfigError, match="'close' with a margin > 0"):
        load_study_config(tmp_path / "s.toml")


def test_report_decides_claims_from_per_item_rows_seed_by_seed(tmp_path):
    """Rows written as a study writes them: the gap is plug-in minus emulator fine-tuned seed by
    seed, the claim's interval comes from the items, the verdict from the interval."""
    import numpy as np

    from recipes.study import ClaimConfig, StudyConfig, StudyGridConfig
    from recipes.study.report import write_report
    from scaleot_fed.rundir import RowCache
    from scaleot_fed.single_owner import NamedEmulatorConfig

    rng = np.random.default_rng(0)

    def row(share_correct):
        correct = rng.random(300) < share_correct
        items = {"loglik": [[0.0, -1.0] if c else [-1.0, 0.0] for c in correct], "gold": [0] * 300,
                 "choice_chars": [[5, 5]] * 300}
        return {"acc": float(correct.mean()), "acc_norm": float(correct.mean()), "n": 300, "items": items}

    rows = RowCache(tmp_path / "run" / "piqa")
    rows.put("full_zero_shot", row(0.5))
    rows.put("u/emulator_zero_shot", row(0.3))
    for seed in (0, 1):
        rows.put(f"u/seed{seed}/plug_in", row(0.8))
        rows.put(f"u/seed{seed}/emulator_finetune", row(0.4))
    claims = [ClaimConfig("plug-in beats the emulator", "u/plug_in", "u/emulator_finetune"),
              ClaimConfig("the emulator is close to plug-in", "u/emulator_finetune", "u/plug_in", kind="close", margin=0.02),
              ClaimConfig("zero-shot beats plug-in", "full_zero_shot", "u/plug_in"),
              ClaimConfig("adapters beat LoRA", "u:adapter/plug_in", "u/plug_in")]
    config = StudyConfig(study=StudyGridConfig(tasks=["piqa"], seeds=[0, 1], resamples=500, variant_emulator="u",
                                            variant_modes=["adapter"], random_subsets=["piqa"]),
                         emulators=[NamedEmulatorConfig(name="u", method="uniform-drop")], claims=claims)
    assert [config.cell_name(e, m) for e, m in config.cells()] == ["u", "u:adapter"]
    summary = write_report(config, tmp_path / "run", tmp_path / "results")
    verdicts = {c["claim"]: c for c in summary["claims"]}
    beats = verdicts["plug-in beats the emulator"]
    assert beats["verdict"] == "holds" and 0.3 < beats["difference"] < 0.5 and beats["seeds"] == [2, 2]
    assert verdicts["the emulator is close to plug-in"]["verdict"] == "does not hold"  # -0.4, far outside 0.02
    assert verdicts["zero-shot beats plug-in"]["verdict"] == "does not hold"
    gap = summary["rows"]["u/gap"]["piqa"]
    plug, emu = (np.mean(summary["rows"][f"u/{r}"]["piqa"]["per_seed"]) for r in ("plug_in", "emulator_finetune"))
    assert gap["mean"] == pytest.approx(plug - emu) and gap["seeds"] == 2
    assert summary["n_eval"] == {"piqa": 300} and len(summary["items_files"]["piqa"]) == 6
    # no emulator of this study is built from stage 1: no section about it
    assert "stage1_stability" not in summary and "Stage 1" not in (tmp_path / "results" / "REPORT.md").read_text()
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "**holds** |" in report  # both sides have every seed they will have: not provisional
    glance = report.split("## Verdicts at a glance")[1].split("## Claims")[0]
    assert f"| plug-in beats the emulator | {100 * beats['difference']:+.1f} **holds** |" in glance
    assert "| zero-shot beats plug-in | " in glance and "**fails** |" in glance
    assert "Items scored: piqa 300 (a limited split, evaluation or training, keeps its first items; in piqa a fixed " \
        "sample instead)" in report
    assert gap["rows"] == [f"u/seed{s}/{r}" for s in (0, 1) for r in ("plug_in", "emulator_finetune")]
    assert gap["per_seed_seeds"] == [0, 1] and summary["rows"]["full_zero_shot"]["piqa"]["per_seed_seeds"] == [None]
    # a side no seed changes will have one seed; a claim with a side not scored yet is listed as pending
    assert verdicts["zero-shot beats plug-in"]["seeds_expected"] == [1, 2] and beats["seeds_expected"] == [2, 2]
    assert summary["pending_claims"] == ["adapters beat LoRA"] and "| adapters beat LoRA | | | | | | pending" in report

    # a row scored again (a run folder's unit deleted and rerun) refreshes its per-item file and the
    # claims on it; the other files are left alone, and a damaged one (a kill mid-write) is rewritten
    items = tmp_path / "results" / summary["items_files"]["piqa"]["u/seed0/plug_in"]
    other = tmp_path / "results" / summary["items_files"]["piqa"]["full_zero_shot"]
    damaged = tmp_path / "results" / summary["items_files"]["piqa"]["u/seed1/plug_in"]
    damaged.write_bytes(damaged.read_bytes()[:20])
    before = other.stat()
    rows.put("u/seed0/plug_in", row(0.1))
    again = write_report(config, tmp_path / "run", tmp_path / "results")
    assert json.loads(gzip.decompress(items.read_bytes()))["acc"] < 0.3
    assert json.loads(gzip.decompress(damaged.read_bytes()))["row"] == "u/seed1/plug_in"
    after = other.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    moved = next(c for c in again["claims"] if c["claim"] == "plug-in beats the emulator")
    assert moved["difference"] < beats["difference"] - 0.2  # seed 0's plug-in fell from ~0.8 to ~0.1


def test_study_metrics_must_name_study_tasks_and_known_metrics(tmp_path):
    from recipes.study import load_study_config
    from scaleot_fed.errors import ConfigError

    for metrics in ('{ piqa = "f1" }', '{ hellaswag = "acc_norm" }'):
        (tmp_path / "s.toml").write_text(f'[study]\ntasks = ["piqa"]\nmetrics = {metrics}\n'
                                         '[[emulator]]\nname = "u"\nmethod = "uniform-drop"\n')
        with pytest.raises(ConfigError, match="study.metrics"):
            load_study_config(tmp_path / "s.toml")


def test_a_tasks_items_may_change_until_it_has_results(tmp_path):
    from recipes.study import StudyGridConfig
    from recipes.study.data import check_task_data
    from scaleot_fed.errors import ConfigError

    saved = {"tasks": ["piqa", "hellaswag", "arc_easy"], "eval_limits": {"hellaswag": 2000}}  # before random_subsets
    run, items = tmp_path / "run", tmp_path / "results" / "items"
    (run / "piqa" / "rows").mkdir(parents=True)
    (run / "hellaswag" / "rows").mkdir(parents=True)  # an empty folder: no results
    (run / "piqa" / "rows" / "full_zero_shot.json").write_text("{}")
    (items / "arc_easy").mkdir(parents=True)  # results kept only in the ledger count too
    (items / "arc_easy" / "full_zero_shot.loglik.json.gz").write_bytes(b"")
    for change in ({"random_subsets": ["hellaswag"]}, {"eval_limits": {"hellaswag": 3000}}, {}):
        check_task_data([run, items], saved, StudyGridConfig(**saved | change))
    for change, refused in (({"random_subsets": ["piqa"]}, "'piqa'"), ({"train_limit": 1000}, "'piqa', 'arc_easy'"),
                            ({"eval_limit": 100}, "'piqa', 'arc_easy'")):
        with pytest.raises(ConfigError, match=rf"the items of \[{refused}\] changed"):
            check_task_data([run, items], saved, StudyGridConfig(**saved | change))
    with pytest.raises(ConfigError, match="study.random_subsets"):
        StudyGridConfig(tasks=["piqa"], random_subsets=["hellaswag"])


def test_the_eta_weighs_tasks_by_their_tokens(tmp_path, gpt2_tokenizer):
    from recipes.study import StudyGridConfig
    from recipes.study.costs import task_tokens
    from recipes.study.data import task_items
    from scaleot_fed.finetune import FinetuneConfig

    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    write_items(short, 40, 0)
    long.write_text("".join(json.dumps({"context": "Question: " + "say it again " * 30 + f"{i}\nAnswer:",
                                        "choices": ["a long answer " * 5, "b"], "gold": 0}) + "\n" for i in range(40)))
    study = StudyGridConfig(tasks=[str(short), str(long)], train_limit=None, dev_items=4)
    ft = FinetuneConfig(steps=10, batch_size=4, max_length=48)
    a, b = (task_tokens(gpt2_tokenizer, *task_items(study, str(t))[::2], ft) for t in (short, long))
    contexts = [len(gpt2_tokenizer(json.loads(line)["context"])["input_ids"]) for line in long.read_text().splitlines()]
    assert b.scoring > sum(contexts) and b.scoring > 5 * a.scoring
    assert b.training == 10 * 4 * 48 and a.training < b.training / 3  # capped at max_length, padded per batch


def test_a_distillation_is_costed_once_in_the_first_pending_unit_that_needs_it(tmp_path, tiny_model_dir, gpt2_tokenizer,
                                                                        monkeypatch):
    import dataclasses

    from recipes.study import Grid, StudyConfig, StudyGridConfig, task_folder
    from recipes.study.costs import model_facts
    from scaleot_fed.config import as_dict
    from scaleot_fed.models import load_model
    from scaleot_fed.single_owner import NamedEmulatorConfig

    write_items(tmp_path / "a.jsonl", 20, 0)
    write_items(tmp_path / "b.jsonl", 20, 0)  # the same items: the same scoring and training cost
    monkeypatch.chdir(tmp_path)
    tasks = ["a.jsonl", "b.jsonl"]  # (task names: each task's rows live in <run>/<task_folder(task)>/)
    config = StudyConfig(study=StudyGridConfig(tasks=tasks, seeds=[0], train_limit=None, dev_items=4),
                         emulators=[NamedEmulatorConfig(name="ot", method="uniform-drop", num_adapter_layers=2,
                                                    alpha=0.5, distill=True)])
    grid = Grid(config, tmp_path / "run", load_model(str(tiny_model_dir)).model, gpt2_tokenizer, print)
    first, second = ({u.label.split(": ", 1)[1]: u.cost for u in grid.units(t)} for t in tasks)
    d = config.distill
    # the teacher's 6 blocks, the student's 4 and its LM head (in blocks: vocabulary x width over a block's parameters)
    facts = model_facts(grid.full)
    assert grid.head_blocks == facts["head_params"] / facts["block_params"] > 1
    assert first["ot/seed0 zero-shot"] - second["ot/seed0 zero-shot"] == pytest.approx(
        d.steps * d.batch_size * d.block_size * (6 + 3 * (4 + grid.head_blocks)))
    # what a schedule weighs: the build missing now, whichever unit pays it in the ETA
    (ot,) = config.emulators
    assert grid.missing_build(ot, 0) == first["ot/seed0 zero-shot"] - second["ot/seed0 zero-shot"]
    assert [u.build() for u in grid.units(tasks[1])][1:3] == [grid.missing_build(ot, 0)] * 2
    assert {k: v for k, v in first.items() if "zero-shot" not in k} == {k: v for k, v in second.items() if "zero-shot" not in k}
    # the weights are gone but the first task's zero-shot row is kept (a lost run folder): the
    # build goes to the next unit that will run, the cell's fine-tuning
    from scaleot_fed.rundir import RowCache

    RowCache(tmp_path / "run" / task_folder(tasks[0])).put("ot/seed0/emulator_zero_shot", {"acc": 0.5})
    grid = Grid(config, tmp_path / "run", grid.full, gpt2_tokenizer, print)
    again = {u.label.split(": ", 1)[1]: u.cost for u in grid.units(tasks[0])}
    build = first["ot/seed0 zero-shot"] - second["ot/seed0 zero-shot"]
    assert again["ot seed 0 fine-tune + plug-in"] == first["ot seed 0 fine-tune + plug-in"] + build
    assert {u.label.split(": ", 1)[1]: u.cost for u in grid.units(tasks[1])} == second
    # a ScaleOT emulator whose stage 1 only the ledger records: its first unit pays the rerun too
    scaleot = NamedEmulatorConfig(name="s", method="scaleot", num_adapter_layers=2, alpha=0.5)
    config = dataclasses.replace(config, emulators=[scaleot])
    grid = Grid(config, tmp_path / "run", grid.full, gpt2_tokenizer, print)
    (stage1,) = grid.stage1_units()
    assert not stage1.done() and grid.units(tasks[0])[1].cost == second["ot/seed0 zero-shot"]  # its own unit pays
    assert stage1.makes == grid.stage1_dir(scaleot, 0) == grid.units(tasks[0])[1].uses
    assert grid.units(tasks[0])[1].build() == stage1.cost == grid.stage1_cost()  # (not on disk: a unit would build it)
    grid.stage1_dir(scaleot, 0).mkdir(parents=True)
    (grid.stage1_dir(scaleot, 0) / "layer_replace.json").write_text("{}")
    assert grid.missing_build(scaleot, 0) == 0.0
    (grid.stage1_dir(scaleot, 0) / "layer_replace.json").unlink()
    record = tmp_path / "ledger" / "stage1" / "na2-a0.5" / "seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"config": as_dict(grid.stage1_config(scaleot, 0))}))
    grid = Grid(config, tmp_path / "run", grid.full, gpt2_tokenizer, print, records=tmp_path / "ledger")
    (stage1,) = grid.stage1_units()
    assert stage1.done() and grid.units(tasks[0])[1].cost == second["ot/seed0 zero-shot"] + stage1.cost


def test_the_units_of_one_emulator_at_one_seed_run_together_and_seed_by_seed(tmp_path, tiny_model_dir, gpt2_tokenizer,
                                                                          monkeypatch):
    """The attack follows its emulator's cells at its seed (a fresh checkout builds the emulator
    once, not again for the attack at the end of the seed), and seeds still run one by one."""
    from recipes.study import Grid, StudyConfig, StudyGridConfig
    from scaleot_fed.models import load_model
    from scaleot_fed.single_owner import NamedEmulatorConfig

    write_items(tmp_path / "a.jsonl", 20, 0)
    monkeypatch.chdir(tmp_path)
    sections = [NamedEmulatorConfig(name="ot", method="uniform-drop", num_adapter_layers=2, alpha=0.5, distill=True),
                NamedEmulatorConfig(name="u", method="uniform-drop", num_adapter_layers=2, alpha=0.5)]
    config = StudyConfig(study=StudyGridConfig(tasks=["a.jsonl"], seeds=[0, 1], train_limit=None, dev_items=4,
                                            full_finetune_lrs=[1e-4], attack_emulator="ot", attack_lrs=[1e-4, 1e-3]),
                         emulators=sections)
    grid = Grid(config, tmp_path / "run", load_model(str(tiny_model_dir)).model, gpt2_tokenizer, print)
    labels = [u.label.split(": ", 1)[1] for u in grid.units("a.jsonl")]
    assert labels == ["full zero-shot",
                      "ot/seed0 zero-shot", "ot seed 0 fine-tune + plug-in", "ot/attack lr 0.0001 seed 0",
                      "ot/attack lr 0.001 seed 0", "u zero-shot", "u seed 0 fine-tune + plug-in",
                      "full_finetune lr 0.0001 seed 0",
                      "ot/seed1 zero-shot", "ot seed 1 fine-tune + plug-in", "ot/attack seed 1 (chosen rate)",
                      "u seed 1 fine-tune + plug-in", "full_finetune seed 1 (chosen rate)"]


def test_an_emulator_rebuilt_unlike_the_ledgers_build_is_refused(tmp_path, tiny_model_dir, gpt2_tokenizer):
    from recipes.study import Grid, StudyConfig, StudyGridConfig, ledger
    from scaleot_fed.errors import ConfigError
    from scaleot_fed.models import load_model
    from scaleot_fed.single_owner import NamedEmulatorConfig

    section = NamedEmulatorConfig(name="u", method="uniform-drop", num_adapter_layers=2, alpha=0.5)
    config = StudyConfig(study=StudyGridConfig(tasks=["piqa"], seeds=[0]), emulators=[section])
    full, records, logged = load_model(str(tiny_model_dir)).model, tmp_path / "ledger", []
    grid = Grid(config, tmp_path / "run", full, gpt2_tokenizer, logged.append, records=records)
    grid.emulator(section, 0)  # built, nothing recorded yet
    manifest = grid.emulator_dir(section, 0) / "manifest.json"
    ledger.record(tmp_path / "run", tmp_path, {})  # (the ledger of results folder tmp_path)
    shutil.rmtree(manifest.parent)  # the run folder lost: rebuilt, the same weights
    Grid(config, tmp_path / "run", full, gpt2_tokenizer, logged.append, records=records).emulator(section, 0)
    assert "rebuilt: the same weights" in logged[-1]
    record = ledger.emulator_record(records, manifest)
    record.write_text(json.dumps(json.loads(record.read_text()) | {"weights_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="not the build the study's rows were made with"):
        Grid(config, tmp_path / "run", full, gpt2_tokenizer, logged.append, records=records).emulator(section, 0)


def test_a_stage1_ranking_an_emulator_was_built_from_is_not_changed(tmp_path, tiny_model_dir, gpt2_tokenizer):
    """A checkout without the run folder and other ranking settings: refused before stage 1 runs
    again when the ledger records an emulator built from the recorded ranking (rebuilt from the new
    one, it would differ), naming what to delete; a ranking nothing was built from may change."""
    import dataclasses

    from recipes.study import Grid, StudyConfig, StudyGridConfig, ledger
    from scaleot_fed.config import as_dict
    from scaleot_fed.errors import ConfigError
    from scaleot_fed.models import load_model
    from scaleot_fed.single_owner import NamedEmulatorConfig

    section = NamedEmulatorConfig(name="s", method="scaleot", num_adapter_layers=2, alpha=0.5)
    config = StudyConfig(study=StudyGridConfig(tasks=["piqa"], seeds=[0]), emulators=[section])
    records = tmp_path / "ledger"
    grid = Grid(config, tmp_path / "run", load_model(str(tiny_model_dir)).model, gpt2_tokenizer, print, records=records)
    path, lr = grid.stage1_dir(section, 0), grid.stage1_config(section, 0)

    def meta(**changed) -> dict:
        return {"data": "lambada", "config": json.loads(json.dumps(as_dict(dataclasses.replace(lr, **changed))))}

    recorded = ledger.stage1_record(records, path / "layer_replace.json")
    recorded.parent.mkdir(parents=True)
    recorded.write_text(json.dumps(meta(ranking_candidates=lr.ranking_candidates + 8)))
    assert grid.ranking_changes(path, json.loads(recorded.read_text()), lr, 0) == ["ranking_candidates"]
    built = ledger.emulator_record(records, grid.emulator_dir(section, 0) / "manifest.json")
    built.parent.mkdir(parents=True)
    built.write_text("{}")
    with pytest.raises(ConfigError, match=r"ranking_candidates changed, but emulators were built .*items/\*/s__\*seed0__\*"):
        grid.stage1(section, 0)
    assert not path.exists()  # refused before the hour of stage 1, not after
    with pytest.raises(ConfigError, match=r"another \[layer_replace\] config"):
        grid.ranking_changes(path, meta(steps=lr.steps + 1), lr, 0)


def test_the_eta_is_the_timed_units_rate_times_what_is_left():
    from recipes.study.costs import eta_line

    left = [("stage 1 na4-a0.5 seed 2", 1e6), ("piqa: full zero-shot", 1e6), ("piqa: u seed 0 fine-tune + plug-in", 2e6)]
    assert eta_line([], 0.0, left) is None  # nothing has run: no rate yet
    # a log without costs (older studies): its 3,600 s over the 2 M block-tokens done, 1,800 s per M
    untimed = [{"unit": "stage 1 na4-a0.5 seed 0", "seconds": 3600.0}]
    line = eta_line(untimed, 2e6, left)
    assert line.endswith("(1800.0 s per M block-tokens): stage 1 0.5 h, piqa 1.5 h; 2.0 h in all")
    # units that logged their cost set the rate, the untimed lump left out: the cost-weighted
    # median (720 s per M), which one unit slowed by other work beside it (9,000 s per M) moves little
    timed = untimed + [{"unit": "piqa: full zero-shot", "seconds": 450.0, "cost": 5e5},
                       {"unit": "piqa: v zero-shot", "seconds": 720.0, "cost": 1e6},
                       {"unit": "piqa: w zero-shot", "seconds": 4500.0, "cost": 5e5}]
    assert eta_line(timed, 3e6, left).endswith("(720.0 s per M block-tokens): stage 1 0.2 h, piqa 0.6 h; 0.8 h in all")
    assert "3 timed units (median)" in eta_line(timed, 3e6, left)


FEDERATED_STUDY = """
[study]
out = "{out}"
model = "{model}"
tasks = ["piqa"]
seeds = [3, 4]
train_limit = 24
dev_items = 4
eval_limit = 6
eval_batch_size = 4
federated = "{fed}"
resamples = 200

[finetune]
steps = 2
batch_size = 4
max_length = 64

[[emulator]]
name = "uniform"
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5

[[claim]]
claim = "federated is close to centralised"
a = "federated/plug_in"
b = "centralised/plug_in"
kind = "close"
margin = 0.5
"""

FEDERATION = """
[run]
model = "{model}"
task = "piqa"
num_rounds = 1
num_clients = 2
clients_per_round = 2
train_limit = 24
client_eval = false
[partition]
kind = "iid"
[finetune]
mode = "lora"
steps = 2
batch_size = 4
max_length = 64
[emulator]
name = "uniform"
"""


def test_study_federated_rows_are_paired_with_their_centralised_twin(tmp_path, tiny_model_dir, capsys, monkeypatch,
                                                                     caplog):
    """The federation runs once per seed on the study's items and emulator (Ray started and shut
    down once per seed in the one study process); its rows and the pooled-data twin's join the
    grid, and a claim between them is decided item by item. The simulation's final table reads
    the study's zero-shot rows instead of scoring them again."""
    caplog.set_level(logging.INFO, logger="scaleot_fed.federation")
    monkeypatch.setenv("SCALEOT_FED_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "fed.toml").write_text(FEDERATION.format(model=tmp_path / "model"))
    (tmp_path / "study.toml").write_text(FEDERATED_STUDY.format(out=tmp_path / "study", model=tmp_path / "model",
                                                                fed=tmp_path / "fed.toml"))
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    (claim,) = summary["claims"]
    assert claim["n"] == 6 and claim["seeds"] == [2, 2] and claim["ci95"][0] <= claim["difference"] <= claim["ci95"][1]
    fed_run = tmp_path / "study" / "piqa" / "federated" / "seed3"
    config = json.loads((fed_run / "config.json").read_text())
    # the study's seed, items and emulator, not the simulation file's own
    assert config["run"]["seed"] == 3 and config["finetune"]["seed"] == 3 and config["run"]["eval_limit"] == 6
    assert config["emulator"]["path"].endswith("emulators/shared/uniform/emulator")
    results = json.loads((fed_run / "results.json").read_text())
    assert results["emulators"]["centralised"]["steps"] == 4  # 1 round x 2 owners x 2 steps
    assert (fed_run / "aggregate.safetensors").is_file() and not (fed_run / "plugged").exists()  # rows, not models
    rows = summary["rows"]
    assert {"federated/plug_in", "federated/gap", "centralised/plug_in"} <= set(rows)
    items = {k: json.loads(gzip.open(tmp_path / "study" / v, "rt").read()) for k, v in summary["items_files"]["piqa"].items()}
    assert items["federated/seed3/plug_in"]["gold"] == items["full_zero_shot"]["gold"]
    # the last round's plug-in scoring is the final table's row (one scoring, not two)
    rounds = json.loads((fed_run / "metrics.json").read_text())["rounds"]
    assert rounds[-1]["plug_in_acc"] == items["federated/seed3/plug_in"]["acc"]
    scored = [r.getMessage() for r in caplog.records if "computing" in r.getMessage()]
    assert scored and not [m for m in scored if "zero_shot" in m], scored  # (the twin's rows are scored)
    for key in ("full_zero_shot", "uniform__emulator_zero_shot"):
        assert (fed_run / "rows" / f"{key}.json").read_text() == (tmp_path / "study" / "piqa" / "rows" / f"{key}.json").read_text()
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    assert "computing" not in capsys.readouterr().out


def test_a_study_cut_inside_a_federation_resumes_it_and_counts_its_earlier_rounds(tmp_path, tiny_model_dir, capsys,
                                                                                  monkeypatch):
    """A study stopped after a federation's first round (its checkpoint on disk) continues that
    simulation from round 2 on the next start, and the unit's logged seconds include round 1's,
    trained by the process that stopped (what the checkpoint records)."""
    import time

    from simulations.checkpoint import checkpointed_seconds

    from . import faults

    monkeypatch.setenv("SCALEOT_FED_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "fed.toml").write_text(FEDERATION.format(model=tmp_path / "model").replace("num_rounds = 1", "num_rounds = 2"))
    (tmp_path / "study.toml").write_text(FEDERATED_STUDY.format(out=tmp_path / "study", model=tmp_path / "model",
                                                                fed=tmp_path / "fed.toml").replace("seeds = [3, 4]", "seeds = [3]"))
    faults.stop_after_round(monkeypatch, 1)
    with pytest.raises(faults.Killed):
        main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"])
    monkeypatch.undo()
    monkeypatch.setenv("SCALEOT_FED_CACHE", str(tmp_path / "cache"))
    fed_run = tmp_path / "study" / "piqa" / "federated" / "seed3"
    units = tmp_path / "study" / "ledger" / "units.jsonl"
    assert checkpointed_seconds(fed_run) > 0 and "federation" not in units.read_text()
    # (round 1's recorded seconds made large, so that the logged unit shows whether they were added)
    monkeypatch.setattr("recipes.study.federated.checkpointed_seconds", lambda folder: 1000.0)
    start = time.perf_counter()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    took = time.perf_counter() - start
    assert [r["round"] for r in json.loads((fed_run / "metrics.json").read_text())["rounds"]] == [1, 2]
    (logged,) = [json.loads(line) for line in units.read_text().splitlines() if "federation" in json.loads(line)["unit"]]
    assert 1000.0 <= logged["seconds"] <= 1000.0 + took  # counted once, beside this process's own time


def test_study_federated_config_must_fit_the_grid(tmp_path, capsys):
    from recipes.study import load_study_config
    from recipes.study.run import run_study
    from scaleot_fed.errors import ConfigError

    (tmp_path / "fed.toml").write_text(FEDERATION.format(model="smollm2-135m").replace('"uniform"', '"other"'))
    (tmp_path / "s.toml").write_text(f'[study]\ntasks = ["arc_easy"]\nfederated = "{tmp_path / "fed.toml"}"\n'
                                     f'out = "{tmp_path / "out"}"\n[[emulator]]\nname = "u"\nmethod = "uniform-drop"\n')
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--no-progress"]) == 2  # before any work
    assert "'other' is not one of the [[emulator]] names ['u']; its tasks ['piqa'] are not all study.tasks" in \
        capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="start the study with `scaleot-fed study`"):
        run_study(load_study_config(tmp_path / "s.toml"))  # the library alone cannot run simulations
    # a federation scores its task's first items: not a study's fixed sample of them
    (tmp_path / "fed.toml").write_text(FEDERATION.format(model="smollm2-135m"))
    (tmp_path / "s.toml").write_text(f'[study]\ntasks = ["piqa"]\nfederated = "{tmp_path / "fed.toml"}"\n'
                                     f'out = "{tmp_path / "out"}"\neval_limit = 6\nrandom_subsets = ["piqa"]\n'
                                     '[[emulator]]\nname = "uniform"\nmethod = "uniform-drop"\n')
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--no-progress"]) == 2
    assert "'piqa' is in study.random_subsets with an eval limit" in capsys.readouterr().err


def test_a_verdict_from_fewer_seeds_than_the_study_is_marked_provisional():
    from recipes.study.markdown import _claims

    claim = {"claim": "a beats b", "task": "piqa", "kind": "greater", "margin": 0.0, "difference": 0.05,
             "ci95": [0.01, 0.09], "n": 100, "verdict": "holds"}

    def verdict(seeds: list[int], expected: list[int]) -> str:
        summary = {"resamples": 100, "seeds": [0, 1, 2], "tasks": ["piqa"],
                   "claims": [claim | {"seeds": seeds, "seeds_expected": expected}],
                   "pending_claims": []}
        return _claims(summary)[-1]

    assert verdict([1, 1], [3, 3]).endswith("**holds** (provisional: seeds 1 of 3, 1 of 3) |")
    assert verdict([3, 2], [3, 3]).endswith("**holds** (provisional: seeds 3 of 3, 2 of 3) |")  # either side short
    assert verdict([3, 1], [3, 1]).endswith("**holds** |")  # e.g. vs full_zero_shot, which has one seed


def test_a_printed_interval_shows_which_side_of_a_boundary_each_bound_is_on():
    from recipes.study.markdown import interval

    def shown(lo: float, hi: float, kind: str = "greater", margin: float = 0.0) -> str:
        return interval({"ci95": [lo, hi], "kind": kind, "margin": margin})

    assert shown(-0.083, -0.047) == "[-8.3, -4.7]"
    assert shown(0.0, 0.107) == "[0.0, +10.7]"  # on the boundary: inconclusive, and printed as such
    assert shown(0.000004, 0.107) == "[+0.0004, +10.7]"  # above it: holds, which "+0.0" would hide
    assert shown(-0.0003, 0.05) == "[-0.03, +5.0]"
    assert shown(-0.038, -0.0199, "close", 0.02) == "[-3.8, -1.99]"  # inside the margin, not on it
    assert shown(-0.038, -0.02, "close", 0.02) == "[-3.8, -2.0]"


def test_a_task_given_by_path_keeps_its_rows_in_the_study_folders(tmp_path, tiny_model_dir):
    """A user's task file (absolute path) is one folder name in the run folder and in ``items/``;
    nothing is written beside the file."""
    from recipes.study import StudyConfig, StudyGridConfig, task_folder
    from recipes.study.report import report_study
    from recipes.study.run import run_study
    from scaleot_fed.errors import ConfigError

    data = tmp_path / "data"
    data.mkdir()
    write_items(data / "mine.jsonl", 16, 0)
    task = str(data / "mine.jsonl")
    assert task_folder("arc_easy") == "arc_easy" and task_folder("piqa+arc_easy") == "piqa+arc_easy"
    assert "/" not in task_folder(task) and len(task_folder("/a" * 200 + ".jsonl")) < 100
    with pytest.raises(ConfigError, match="would share a folder"):  # two paths that make one name
        StudyGridConfig(tasks=[task, task.lstrip("/")])
    config = StudyConfig(study=StudyGridConfig(out=str(tmp_path / "run"), results=str(tmp_path / "results"),
                                            model=str(tiny_model_dir), tasks=[task], seeds=[0], train_limit=None,
                                            dev_items=4, eval_limit=6, eval_batch_size=4, resamples=100))
    summary = run_study(config)
    assert summary["n_eval"] == {task: 6} and [p.name for p in data.iterdir()] == ["mine.jsonl"]
    assert (tmp_path / "run" / task_folder(task) / "rows" / "full_zero_shot.json").is_file()
    assert summary["items_files"][task] == {"full_zero_shot": f"items/{task_folder(task)}/full_zero_shot.loglik.json.gz"}
    shutil.rmtree(tmp_path / "run")  # the ledger alone reports it
    assert report_study(config)["rows"] == summary["rows"]


def test_a_plan_marks_the_unit_a_live_study_is_working_on(tmp_path):
    import os

    from recipes.study.plan import plan_line
    from scaleot_fed.rundir import lock_run_dir, mark_running, running_unit, unlock_run_dir

    out = tmp_path / "run"
    assert running_unit(out) is None
    lock_run_dir(out)
    mark_running(out, "piqa: full zero-shot")
    now = running_unit(out)
    assert now["unit"] == "piqa: full zero-shot" and now["pid"] == os.getpid()
    line = plan_line("piqa: full zero-shot", 3e6, 60e-6, now)
    assert line == f"  piqa: full zero-shot: 3.0 M block-tokens, ~3.0 min; running for 0.0 min when this plan began " \
        f"(PID {os.getpid()})"
    assert "running for 2.0 min" in plan_line("piqa: full zero-shot", 3e6, 0.0, now | {"at": now["since"] + 120})
    assert plan_line("piqa: uniform zero-shot", 3e6, 0.0, now) == "  piqa: uniform zero-shot: 3.0 M block-tokens"
    # a marker left by a run that is gone (killed mid-unit) or that no longer holds the lock: nothing runs
    (out / "running.json").write_text(json.dumps(now | {"pid": 2**22 + 7}))  # above Linux's pid_max default
    assert running_unit(out) is None
    mark_running(out, "piqa: full zero-shot")
    unlock_run_dir(out)
    (out / ".lock").write_text("1\n")  # another holder
    assert running_unit(out) is None
    mark_running(out, None)
    assert not (out / "running.json").exists() and running_unit(out) is None


def test_a_claim_over_every_task_is_the_mean_of_the_tasks_differences_once_all_have_the_same_seeds(tmp_path):
    import numpy as np

    from recipes.study import ClaimConfig, StudyConfig, StudyGridConfig
    from recipes.study.report import write_report
    from scaleot_fed.rundir import RowCache
    from scaleot_fed.single_owner import NamedEmulatorConfig

    def row(correct: list[bool]) -> dict:
        items = {"loglik": [[0.0, -1.0] if c else [-1.0, 0.0] for c in correct], "gold": [0] * len(correct),
                 "choice_chars": [[5, 5]] * len(correct)}
        return {"acc": float(np.mean(correct)), "acc_norm": float(np.mean(correct)), "n": len(correct), "items": items}

    # piqa: 100 items, plug-in right on all, emulator on half (+0.5); arc_easy: 300 items, +0.1
    share = {"piqa": (100, 1.0, 0.5), "arc_easy": (300, 0.6, 0.5)}
    for task, (n, plug, emu) in share.items():
        rows = RowCache(tmp_path / "run" / task)
        for seed in (0, 1):
            rows.put(f"u/seed{seed}/plug_in", row([i < plug * n for i in range(n)]))
            if task == "piqa" or seed == 0:  # arc_easy's emulator row at seed 1 not scored yet
                rows.put(f"u/seed{seed}/emulator_finetune", row([i < emu * n for i in range(n)]))
    claims = [ClaimConfig("plug-in beats the emulator", "u/plug_in", "u/emulator_finetune")]
    config = StudyConfig(study=StudyGridConfig(tasks=["piqa", "arc_easy"], seeds=[0, 1], resamples=300),
                         emulators=[NamedEmulatorConfig(name="u", method="uniform-drop")], claims=claims)
    found = {c["task"]: c for c in write_report(config, tmp_path / "run", tmp_path / "results")["claims"]}
    assert set(found) == {"piqa", "arc_easy"}  # arc_easy's emulator side has seed 0 only: no mean yet
    RowCache(tmp_path / "run" / "arc_easy").put("u/seed1/emulator_finetune", row([i < 150 for i in range(300)]))
    summary = write_report(config, tmp_path / "run", tmp_path / "results")
    pooled = next(c for c in summary["claims"] if c["task"] == "all (mean over tasks)")
    # each task weighs the same: (0.5 + 0.1) / 2, not the item-weighted (50 + 30) / 400
    assert pooled["difference"] == pytest.approx(0.3) and pooled["n"] == 400 and pooled["seeds"] == [2, 2]
    assert pooled["verdict"] == "holds"
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "| all (mean over tasks) | +30.0 | " in report and "| 400 (2 tasks, equal weight) |" in report
    assert "| plug-in beats the emulator | +50.0 **holds** | +10.0 **holds** | +30.0 **holds** |" in report
    # a task added after the first row: the claim over tasks is decided with it and without it
    third = RowCache(tmp_path / "run" / "arc_challenge")
    for seed in (0, 1):
        third.put(f"u/seed{seed}/plug_in", row([True] * 50))
        third.put(f"u/seed{seed}/emulator_finetune", row([False] * 50))
    config.study = StudyGridConfig(tasks=["piqa", "arc_easy", "arc_challenge"], seeds=[0, 1], resamples=300,
                                added_tasks=["arc_challenge"])
    found = {c["task"]: c for c in write_report(config, tmp_path / "run", tmp_path / "results")["claims"]}
    assert found["all (mean over tasks)"]["difference"] == pytest.approx((0.5 + 0.1 + 1.0) / 3)
    without = found["all but arc_challenge (mean over tasks)"]
    assert without["difference"] == pytest.approx(0.3) and without["tasks"] == ["piqa", "arc_easy"]
    assert "| 400 (2 tasks, equal weight) |" in (tmp_path / "results" / "REPORT.md").read_text()


MODES = """
[study]
out = "{out}"
results = "{results}"
model = "{model}"
tasks = ["piqa"]
seeds = [0, 1]
modes = ["full", "lora"]
mode_sweeps = {{ full = [1e-4, 1e-2] }}
{declared}
train_limit = 24
dev_items = 4
eval_limit = 6
eval_batch_size = 4
resamples = 200

[finetune]
steps = 2
batch_size = 4
max_length = 64
eval_every = 1

[[emulator]]
name = "uniform"
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5

[[claim]]
claim = "plug-in beats the emulator fine-tuned"
a = "uniform/plug_in"
b = "uniform/emulator_finetune"
"""


def test_a_modes_rate_is_swept_by_dev_loss_alone_and_declared_before_its_cells_run(tmp_path, tiny_model_dir,
                                                                                     capsys, monkeypatch):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    results, config = tmp_path / "results", tmp_path / "study.toml"

    def write(declared: str) -> None:
        config.write_text(MODES.format(out=tmp_path / "study", results=results, model=tmp_path / "model",
                                       declared=declared))

    import scaleot_fed.single_owner as single_owner

    scored = []
    real_score = single_owner.score_items
    monkeypatch.setattr(single_owner, "score_items", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    write("")
    assert main(["study", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((results / "summary.json").read_text())
    sweep = summary["sweeps"]["mode full"]["piqa"]
    losses = {e["lr"]: e["best_dev_loss"] for e in sweep}
    chosen = min(losses, key=lambda lr: (losses[lr], lr))
    assert summary["sweeps"]["mode full"]["piqa chosen"] == chosen and len(losses) == 2
    rows = sorted(p.name for p in (tmp_path / "study" / "piqa" / "rows").glob("sweep__*"))
    assert rows == ["sweep__full__lr0.0001__seed0__row.json", "sweep__full__lr0.01__seed0__row.json"]
    for name in rows:  # dev loss only: the evaluation items are never scored for a sweep
        assert "items" not in json.loads((tmp_path / "study" / "piqa" / "rows" / name).read_text())
    # the swept mode's cells wait; the other mode (no sweep: [finetune] lr) ran
    assert f"declare it in the config as [study] mode_lrs.full = {chosen:g}" in out
    assert "uniform:lora/plug_in" in summary["rows"] and "uniform/plug_in" not in summary["rows"]
    assert [c["mode"] for c in summary["claims"] if c["task"] == "piqa"] == ["lora"]
    assert any("[full]" in p for p in summary["pending_claims"])
    n_scored = len(scored)
    # a plan says the same, also from a fresh checkout: the sweep's rows are in the committed ledger
    for row in (tmp_path / "study" / "piqa" / "rows").glob("sweep__*"):
        row.unlink()
    assert main(["study", "--config", str(config), "--plan"]) == 0
    assert f"units wait: the full sweep chose lr {chosen:g} by dev loss" in capsys.readouterr().out
    # a rate that is not the sweep's choice is refused before anything runs
    other = 1e-2 if chosen == 1e-4 else 1e-4
    write(f"mode_lrs = {{ full = {other:g} }}")
    assert main(["study", "--config", str(config), "--no-progress"]) == 2
    assert f"but the full sweep chose {chosen:g} by dev loss" in capsys.readouterr().err
    write(f"mode_lrs = {{ full = {chosen:g} }}")
    assert main(["study", "--config", str(config), "--no-progress"]) == 0
    summary = json.loads((results / "summary.json").read_text())
    row = json.loads((tmp_path / "study" / "piqa" / "rows" / "uniform__seed1__emulator_finetune.json").read_text())
    assert row["lr"] == chosen and row["mode"] == "full" and len(scored) > n_scored
    assert sorted(c["mode"] for c in summary["claims"] if c["task"] == "piqa") == ["full", "lora"]
    assert all(c["paired_seeds"] for c in summary["claims"])  # both sides from seeds 0 and 1
    assert {c["mode"] for c in summary["claims_other_metric"]} == {"full", "lora"}


def test_a_study_runs_seed_by_seed_across_tasks_and_a_mode_only_on_its_tasks(tmp_path, tiny_model_dir, gpt2_tokenizer,
                                                                           monkeypatch):
    """Seed 0 of every task before seed 1 of any (a session without the run folder rebuilds a seed's
    stage 1 and emulators once for every task it reaches), an emulator's units together across
    tasks; a mode with ``mode_tasks`` has cells on those tasks alone."""
    from recipes.study import Grid, StudyConfig, StudyGridConfig
    from scaleot_fed.models import load_model
    from scaleot_fed.single_owner import NamedEmulatorConfig

    for name in ("a.jsonl", "b.jsonl"):
        write_items(tmp_path / name, 20, 0)
    monkeypatch.chdir(tmp_path)
    sections = [NamedEmulatorConfig(name="ot", method="uniform-drop", num_adapter_layers=2, alpha=0.5, distill=True),
                NamedEmulatorConfig(name="u", method="uniform-drop", num_adapter_layers=2, alpha=0.5)]
    config = StudyConfig(study=StudyGridConfig(tasks=["a.jsonl", "b.jsonl"], seeds=[0, 1], train_limit=None, dev_items=4,
                                            modes=["lora", "full"], mode_tasks={"full": ["b.jsonl"]}),
                         emulators=sections)
    grid = Grid(config, tmp_path / "run", load_model(str(tiny_model_dir)).model, gpt2_tokenizer, print)
    units = grid.all_units()
    assert [u.label for u in units] == ["a.jsonl: full zero-shot", "b.jsonl: full zero-shot",
                      "a.jsonl: ot/seed0 zero-shot", "a.jsonl: ot seed 0 fine-tune + plug-in",
                      "b.jsonl: ot/seed0 zero-shot", "b.jsonl: ot seed 0 fine-tune + plug-in",
                      "b.jsonl: ot:full seed 0 fine-tune + plug-in",
                      "a.jsonl: u zero-shot", "a.jsonl: u seed 0 fine-tune + plug-in",
                      "b.jsonl: u zero-shot", "b.jsonl: u seed 0 fine-tune + plug-in", "b.jsonl: u:full seed 0 fine-tune + plug-in",
                      "a.jsonl: ot/seed1 zero-shot", "a.jsonl: ot seed 1 fine-tune + plug-in",
                      "b.jsonl: ot/seed1 zero-shot", "b.jsonl: ot seed 1 fine-tune + plug-in",
                      "b.jsonl: ot:full seed 1 fine-tune + plug-in",
                      "a.jsonl: u seed 1 fine-tune + plug-in", "b.jsonl: u seed 1 fine-tune + plug-in",
                      "b.jsonl: u:full seed 1 fine-tune + plug-in"]
    # the distillation is charged once, to the first unit that needs it, wherever its task is
    builds = [u for u in units if u.label.endswith("ot/seed0 zero-shot")]
    assert builds[0].cost > builds[1].cost


def test_each_seeds_stage1_runs_just_before_the_first_unit_built_from_it(tmp_path, tiny_model_dir, gpt2_tokenizer,
                                                                         monkeypatch):
    """Not every seed's stage 1 up front: a run folder lost between sessions would take the later
    seeds' stage 1 with it before any unit had used them."""
    from recipes.study import Grid, StudyConfig, StudyGridConfig
    from scaleot_fed.models import load_model
    from scaleot_fed.single_owner import NamedEmulatorConfig

    write_items(tmp_path / "a.jsonl", 20, 0)
    monkeypatch.chdir(tmp_path)
    sections = [NamedEmulatorConfig(name="u", method="uniform-drop", num_adapter_layers=2, alpha=0.5),
                NamedEmulatorConfig(name="s", method="scaleot", num_adapter_layers=2, alpha=0.5),
                NamedEmulatorConfig(name="t", method="scaleot", num_adapter_layers=2, alpha=0.5, rank_keep_ratio=0.5)]
    config = StudyConfig(study=StudyGridConfig(tasks=["a.jsonl"], seeds=[0, 1], train_limit=None, dev_items=4),
                         emulators=sections)
    grid = Grid(config, tmp_path / "run", load_model(str(tiny_model_dir)).model, gpt2_tokenizer, print)
    labels = [u.label for u in grid.all_units()]
    assert labels == ["a.jsonl: full zero-shot", "a.jsonl: u zero-shot", "a.jsonl: u seed 0 fine-tune + plug-in",
                      "stage 1 na2-a0.5 seed 0", "a.jsonl: s/seed0 zero-shot", "a.jsonl: s seed 0 fine-tune + plug-in",
                      "a.jsonl: t/seed0 zero-shot", "a.jsonl: t seed 0 fine-tune + plug-in",
                      "a.jsonl: u seed 1 fine-tune + plug-in",
                      "stage 1 na2-a0.5 seed 1", "a.jsonl: s/seed1 zero-shot", "a.jsonl: s seed 1 fine-tune + plug-in",
                      "a.jsonl: t/seed1 zero-shot", "a.jsonl: t seed 1 fine-tune + plug-in"]
    assert len(grid.stage1_units()) == 2  # one per seed, shared by both emulators built from it


def test_mode_tasks_name_later_modes_and_tasks_of_the_study(tmp_path):
    from recipes.study import StudyGridConfig
    from scaleot_fed.errors import ConfigError

    for bad in ({"lora": ["piqa"]}, {"full": ["hellaswag"]}, {"full": []}, {"bottleneck": ["piqa"]}):
        with pytest.raises(ConfigError, match="study.mode_tasks maps modes after the first"):
            StudyGridConfig(tasks=["piqa", "arc_easy"], modes=["lora", "full"], mode_tasks=bad)
    with pytest.raises(ConfigError, match="including the sweep task 'arc_easy'"):  # its sweep runs on a task it skips
        StudyGridConfig(tasks=["arc_easy", "piqa"], modes=["lora", "full"], mode_sweeps={"full": [1e-4, 1e-3]},
                        mode_tasks={"full": ["piqa"]})
    study = StudyGridConfig(tasks=["piqa", "arc_easy"], modes=["lora", "full"], mode_tasks={"full": ["piqa"]})
    assert study.tasks_of("full") == ["piqa"] and study.tasks_of("lora") == study.tasks_of(None) == ["piqa", "arc_easy"]


def test_rebuilt_differently_is_refuse_or_accept():
    from recipes.study import StudyGridConfig
    from scaleot_fed.errors import ConfigError

    assert StudyGridConfig().rebuilt_differently == "refuse"  # a study never mixes builds unless told to
    with pytest.raises(ConfigError, match='study.rebuilt_differently is "refuse" or "accept"'):
        StudyGridConfig(rebuilt_differently="yes")


def test_a_modes_claims_pool_only_the_tasks_it_runs_on(tmp_path):
    import numpy as np

    from recipes.study import ClaimConfig, StudyConfig, StudyGridConfig
    from recipes.study.config import per_mode
    from recipes.study.report import write_report
    from scaleot_fed.rundir import RowCache
    from scaleot_fed.single_owner import NamedEmulatorConfig

    def row(correct: list[bool]) -> dict:
        items = {"loglik": [[0.0, -1.0] if c else [-1.0, 0.0] for c in correct], "gold": [0] * len(correct),
                 "choice_chars": [[5, 5]] * len(correct)}
        return {"acc": float(np.mean(correct)), "acc_norm": float(np.mean(correct)), "n": len(correct), "items": items}

    tasks = ["piqa", "arc_easy", "arc_challenge"]
    for task in tasks:
        rows = RowCache(tmp_path / "run" / task)
        for seed in (0, 1):
            for cell in ("u", "u:full") if task != "arc_easy" else ("u",):
                rows.put(f"{cell}/seed{seed}/plug_in", row([i < 30 for i in range(40)]))
                rows.put(f"{cell}/seed{seed}/emulator_finetune", row([i < 20 for i in range(40)]))
    config = StudyConfig(study=StudyGridConfig(tasks=tasks, seeds=[0, 1], resamples=300, modes=["lora", "full"],
                                            mode_tasks={"full": ["piqa", "arc_challenge"]}),
                         emulators=[NamedEmulatorConfig(name="u", method="uniform-drop")])
    config.claims = per_mode(config, ClaimConfig("plug-in beats the emulator", "u/plug_in", "u/emulator_finetune"))
    config.claims.append(ClaimConfig("full's plug-in beats LoRA's", "u:full/plug_in", "u/plug_in"))  # names a mode itself
    summary = write_report(config, tmp_path / "run", tmp_path / "results")
    pooled = {c["mode"]: c for c in summary["claims"] if c["task"] == "all (mean over tasks)"}
    assert pooled["lora"]["tasks"] == tasks and pooled["full"]["tasks"] == ["piqa", "arc_challenge"]
    assert pooled[None]["tasks"] == ["piqa", "arc_challenge"]  # the tasks both its rows run on
    assert pooled["full"]["n"] == 80 and not summary["pending_claims"]
    assert summary["mode_tasks"] == {"full": ["piqa", "arc_challenge"]}


def test_a_study_is_tracked_unit_by_unit_and_a_resume_continues_its_run(tmp_path, tiny_model_dir, capsys):
    from .test_tracking import mlflow_run

    (tmp_path / "model").symlink_to(tiny_model_dir)
    head, _, _ = MODES.partition("[[emulator]]")
    text = head.replace('modes = ["full", "lora"]\nmode_sweeps = {{ full = [1e-4, 1e-2] }}\n{declared}\n', 'modes = ["lora"]\n')
    text = text.format(out=tmp_path / "study", results=tmp_path / "results", model=tmp_path / "model")
    text += ('[[emulator]]\nname = "uniform"\nmethod = "uniform-drop"\nnum_adapter_layers = 2\nalpha = 0.5\n\n'
             '[[claim]]\nclaim = "plug-in beats the emulator fine-tuned"\na = "uniform/plug_in"\n'
             'b = "uniform/emulator_finetune"\n\n[tracking]\nbackend = "mlflow"\n')
    (tmp_path / "study.toml").write_text(text)
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    client, run = mlflow_run(tmp_path / "study")
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    plug = summary["rows"]["uniform/plug_in"]["piqa"]["per_seed"]
    key = "piqa: uniform seed 1 fine-tune _ plug-in/plug_in/acc"  # (unit labels in the names every backend takes)
    assert [m.value for m in client.get_metric_history(run.info.run_id, key)] == [pytest.approx(plug[1])]
    claim = next(c for c in summary["claims"] if c["task"] == "piqa")
    tracked = run.data.metrics["claims/plug-in beats the emulator fine-tuned/piqa/difference"]
    assert tracked == pytest.approx(claim["difference"])
    assert {"REPORT.md", "summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    steps = max(m.step for m in client.get_metric_history(run.info.run_id, key))
    # a resume (nothing left to run) continues the same tracked run
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    again, rerun = mlflow_run(tmp_path / "study")
    assert rerun.info.run_id == run.info.run_id and len(again.search_runs([run.info.experiment_id])) == 1
    assert steps >= 3 and capsys.readouterr()


FEDERATIONS_STUDY = """
[study]
out = "{out}"
model = "{model}"
tasks = ["piqa", "arc_easy"]
seeds = [3]
train_limit = 24
dev_items = 4
eval_limit = 6
eval_batch_size = 4
resamples = 200

[finetune]
steps = 2
batch_size = 4
max_length = 64

[[emulator]]
name = "uniform"
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5

[federations]
config = "{fed}"
tasks = ["piqa"]
strategies = {{ fedavg = {{ strategy = {{ name = "fedavg" }} }}, prox = {{ strategy = {{ name = "fedprox", params = {{ proximal_mu = 0.5 }} }} }} }}
partitions = {{ label = {{ partition = {{ kind = "label-skew", alpha = 0.5 }} }} }}
centralised = true

[[federation]]
name = "tasks"
config = "{fed}"
tasks = ["piqa", "arc_easy"]
set = {{ run = {{ task = "piqa+arc_easy" }}, partition = {{ kind = "task", tasks = [["piqa"], ["arc_easy"]] }} }}

[[claim]]
claim = "FedProx's worst owner beats FedAvg's under label skew"
a = "prox-label/worst_owner"
b = "fedavg-label/worst_owner"

[[claim]]
claim = "FedProx beats FedAvg under label skew"
a = "prox-label/plug_in"
b = "fedavg-label/plug_in"
"""


def test_a_grid_of_federations_is_scored_per_task_and_per_owner(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Strategies x partitions expand to one federation each (the first strategy with the pooled
    twin), every one on the study's items; a mixture federation (owners holding different tasks)
    runs once and is scored on both tasks; worst-owner claims are decided on the same owners'
    items; the report gives accuracy, worst owner, bytes and seconds per round per federated row."""
    monkeypatch.setenv("SCALEOT_FED_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "fed.toml").write_text(FEDERATION.format(model=tmp_path / "model"))
    (tmp_path / "study.toml").write_text(FEDERATIONS_STUDY.format(out=tmp_path / "study", model=tmp_path / "model",
                                                                  fed=tmp_path / "fed.toml"))
    from recipes.study import load_study_config

    config = load_study_config(tmp_path / "study.toml")
    assert [(f.name, f.centralised) for f in config.federations] == [
        ("tasks", None), ("fedavg-label", "centralised-label"), ("prox-label", None)]
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    rows = summary["rows"]
    for name in ("fedavg-label", "prox-label", "centralised-label"):
        assert set(rows[f"{name}/plug_in"]) == {"piqa"}, name
    assert set(rows["tasks/plug_in"]) == {"piqa", "arc_easy"}  # one run, scored on both tasks
    runs = sorted(p.relative_to(tmp_path / "study").as_posix() for p in (tmp_path / "study").glob("*/federations/*/seed3"))
    assert runs == ["piqa/federations/fedavg-label/seed3", "piqa/federations/prox-label/seed3",
                    "piqa/federations/tasks/seed3"]
    fed_config = json.loads((tmp_path / "study" / "piqa" / "federations" / "prox-label" / "seed3" / "config.json").read_text())
    # the mixture's simulation scores its first task with that task's zero-shot rows, not its own
    mixture = tmp_path / "study" / "piqa" / "federations" / "tasks" / "seed3" / "rows"
    assert (mixture / "full_zero_shot.json").read_text() == (tmp_path / "study" / "piqa" / "rows" / "full_zero_shot.json").read_text()
    assert fed_config["strategy"] == {"name": "fedprox", "params": {"proximal_mu": 0.5}}
    assert fed_config["partition"]["kind"] == "label-skew" and fed_config["run"]["per_owner_eval"]
    # the worst owner: each owner's held-out items, the same owners on both sides
    worst = rows["prox-label/worst_owner"]["piqa"]
    assert worst["owners"] == [2] and worst["per_seed"][0] <= rows["prox-label/owner_mean"]["piqa"]["per_seed"][0]
    claims = {c["claim"]: c for c in summary["claims"]}
    owner_claim = claims["FedProx's worst owner beats FedAvg's under label skew"]
    assert owner_claim["task"] == "piqa" and owner_claim["ci95"][0] <= owner_claim["difference"] <= owner_claim["ci95"][1]
    assert owner_claim["difference"] == pytest.approx(worst["mean"] - rows["fedavg-label/worst_owner"]["piqa"]["mean"])
    assert owner_claim["interval"] in {"percentile", "simultaneous"} and worst["interval"] in {"percentile", "simultaneous"}
    table = summary["federations"]["prox-label"]["piqa"]
    assert table["mb_up"] > 0 and table["seconds_per_round"] > 0 and table["curves"]["round"] == [1]
    assert table["emulator_mb"] > 0  # the emulator each owner receives, beside the rounds' bytes
    assert 1 <= table["owner_items"][0] <= table["owner_items"][1]  # the fewest and most items an owner held
    report = (tmp_path / "study" / "REPORT.md").read_text()
    assert "## Federations" in report and "| prox-label | piqa |" in report
    assert "where the worst owner is identified" in report  # how a worst owner's interval is made
    assert (tmp_path / "study" / "federations.png").is_file()
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    assert "computing" not in capsys.readouterr().out  # resumed: nothing left


def test_federation_tables_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "fed.toml").write_text(FEDERATION.format(model="smollm2-135m"))
    head = f'[study]\ntasks = ["piqa"]\nout = "{tmp_path / "out"}"\n[[emulator]]\nname = "uniform"\nmethod = "uniform-drop"\n'
    cases = [
        (f'[[federation]]\nname = "uniform"\nconfig = "{tmp_path / "fed.toml"}"\n', "must be distinct and not an emulator's"),
        (f'[[federation]]\nname = "a b"\nconfig = "{tmp_path / "fed.toml"}"\n', "needs a name (letters, digits"),
        (f'[federations]\nconfig = "{tmp_path / "fed.toml"}"\nstrategies = {{ fedavg = 1 }}\npartitions = {{ iid = {{}} }}\n',
         "not tables: fedavg"),
        (f'[[federation]]\nname = "f"\nconfig = "{tmp_path / "fed.toml"}"\nset = {{ strategy = {{ name = "nope" }} }}\n',
         "federation 'f'"),
        (f'[[federation]]\nname = "f"\nconfig = "{tmp_path / "fed.toml"}"\ntasks = ["arc_easy"]\n',
         "its tasks ['arc_easy'] are not all study.tasks"),
        # every seed's owners are drawn at load: 24 items cannot give 2 owners 13 each
        (f'[[federation]]\nname = "f"\nconfig = "{tmp_path / "fed.toml"}"\n'
         'set = { partition = { kind = "label-skew", alpha = 0.1, min_partition_size = 13 } }\n',
         "federation 'f' on piqa at seed 0: partition label-skew by 'gold' cannot split piqa: none of 110"),
        (f'[[federation]]\nname = "f"\nconfig = "{tmp_path / "fed.toml"}"\n[[federation]]\nname = "g"\n'
         f'config = "{tmp_path / "fed.toml"}"\n[[claim]]\nclaim = "x"\na = "f/worst_owner"\nb = "g/plug_in"\n',
         "an owner row (worst_owner, owner_mean) is compared with the same owner row"),
    ]
    for body, message in cases:
        (tmp_path / "s.toml").write_text(head + body)
        assert main(["study", "--config", str(tmp_path / "s.toml"), "--plan"]) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_plan_before_any_timed_unit_is_priced_at_another_studys_rate(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    head, _, _ = MODES.partition("[[emulator]]")
    text = head.replace('modes = ["full", "lora"]\nmode_sweeps = {{ full = [1e-4, 1e-2] }}\n{declared}\n', 'modes = ["lora"]\n')
    text = text.format(out=tmp_path / "study", results=tmp_path / "results", model=tmp_path / "model")
    (tmp_path / "study.toml").write_text(text + '[[emulator]]\nname = "u"\nmethod = "uniform-drop"\nnum_adapter_layers = 2\n')
    other = tmp_path / "other" / "ledger"
    other.mkdir(parents=True)
    (other / "units.jsonl").write_text(json.dumps({"unit": "x", "seconds": 30.0, "cost": 1e6}) + "\n")
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--plan", "--rate-from", str(tmp_path / "other")]) == 0
    out = capsys.readouterr().out
    assert f"priced at {tmp_path / 'other'}'s rate: left at the rate of 1 timed units (median) (30.0 s per M" in out
    assert "piqa: full zero-shot:" in out and " min" in out.split("piqa: full zero-shot:")[1].splitlines()[0]
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--plan", "--rate-from", str(tmp_path)]) == 2
    assert "no timed unit in a compute log there" in capsys.readouterr().err
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--rate-from", str(tmp_path / "other")]) == 2
    assert "--rate-from prices a --plan" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_a_federation_changed_under_its_name_or_owner_rows_of_other_owners_are_refused(tmp_path, capsys):
    (tmp_path / "fed.toml").write_text(FEDERATION.format(model="smollm2-135m"))
    head = (f'[study]\ntasks = ["piqa"]\nout = "{tmp_path / "out"}"\nresults = "{tmp_path / "res"}"\n'
            '[[emulator]]\nname = "uniform"\nmethod = "uniform-drop"\n')
    fed = f'[[federation]]\nname = "f"\nconfig = "{tmp_path / "fed.toml"}"\n'
    # rows made with FedAvg (the ledger records it); the same name now with FedProx: refused
    from recipes.study import ledger, load_study_config
    from recipes.study.federated import load_federations

    (tmp_path / "s.toml").write_text(head + fed)
    ledger.record_federations(tmp_path / "res", {f.name: f.resolved() for f in
                                                 load_federations(load_study_config(tmp_path / "s.toml"), "s.toml")})
    record = tmp_path / "res" / "ledger" / "federations.json"
    assert json.loads(record.read_text())["f"]["strategy"]["name"] == "fedavg"
    # a record made before a key existed (here run.save_plugged) matches: the key's default is the old behaviour
    older = json.loads(record.read_text())
    del older["f"]["run"]["save_plugged"]
    record.write_text(json.dumps(older))
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--plan"]) == 0, capsys.readouterr().err
    # keys the study sets in every simulation itself (items, seed, the final table) change no row
    (tmp_path / "s.toml").write_text(head + fed + 'set = { run = { eval_limit = 3, save_plugged = true } }\n')
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--plan"]) == 0, capsys.readouterr().err
    # a federation scored in another precision than the study's rows would not pair with them
    (tmp_path / "s.toml").write_text(head + fed + 'set = { run = { eval_dtype = "bfloat16" } }\n')
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--plan"]) == 2
    assert "but the study scores every row on 'auto' in 'float32'" in capsys.readouterr().err
    (tmp_path / "s.toml").write_text(head + fed + 'set = { strategy = { name = "fedprox" } }\n')
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--plan"]) == 2
    assert "federation 'f' changed since its rows were made (strategy.name)" in capsys.readouterr().err
    # worst owners of an iid and a label-skewed federation are not the same owners
    other = f'[[federation]]\nname = "g"\nconfig = "{tmp_path / "fed.toml"}"\nset = {{ partition = {{ kind = "label-skew" }} }}\n'
    claim = '[[claim]]\nclaim = "x"\na = "f/worst_owner"\nb = "g/worst_owner"\n'
    (tmp_path / "s.toml").write_text(head + fed + other + claim)
    assert main(["study", "--config", str(tmp_path / "s.toml"), "--plan"]) == 2
    assert "f and g do not have the same owners" in capsys.readouterr().err


def test_an_owner_claim_is_decided_per_task_and_over_the_tasks(tmp_path):
    """Per-owner rows as a federation writes them on two tasks: the worst-owner claim gets a line
    per task and one over both (the mean of the tasks' differences), with how its interval was made."""
    import numpy as np

    from recipes.study import load_study_config
    from recipes.study.report import write_report
    from scaleot_fed.rundir import RowCache

    (tmp_path / "fed.toml").write_text(FEDERATION.format(model=tmp_path / "model"))
    (tmp_path / "study.toml").write_text(FEDERATIONS_STUDY.format(out=tmp_path / "run", model=tmp_path / "model",
                                                                  fed=tmp_path / "fed.toml")
                                         .replace('tasks = ["piqa"]\nstrategies', 'tasks = ["piqa", "arc_easy"]\nstrategies')
                                         .replace("seeds = [3]", "seeds = [0, 1]").replace("resamples = 200", "resamples = 300"))
    config = load_study_config(tmp_path / "study.toml")

    def items(correct: np.ndarray) -> dict:
        return {"loglik": [[0.0, -1.0] if c else [-1.0, 0.0] for c in correct], "gold": [0] * len(correct),
                "choice_chars": [[5, 5]] * len(correct)}

    rng = np.random.default_rng(0)
    lifts = {"piqa": 0.2, "arc_easy": 0.0}  # FedProx lifts the weakest owner on PIQA only
    for task, lift in lifts.items():
        rows = RowCache(tmp_path / "run" / task)
        for seed in (0, 1) if task == "piqa" else (0,):
            owners = [rng.random(200) < p for p in (0.3, 0.8, 0.9)]  # FedAvg's owners: the first clearly worst
            for name, lifted in (("fedavg-label", owners), ("prox-label", [owners[0] | (rng.random(200) < lift)] + owners[1:])):
                every = np.concatenate(lifted)
                rows.put(f"{name}/seed{seed}/plug_in", {"acc": float(every.mean()), "acc_norm": float(every.mean()),
                                                        "n": every.size, "items": items(every),
                                                        "owners": {str(o): items(c) for o, c in enumerate(lifted)}})
            if task == "arc_easy" and seed == 0:  # not pooled while ARC-Easy lacks a seed PIQA has
                partial = write_report(config, tmp_path / "run", tmp_path / "results")
                assert {c["task"] for c in partial["claims"] if c["a"] == "prox-label/worst_owner"} == {"piqa", "arc_easy"}
                for name in ("fedavg-label", "prox-label"):  # then its seed 1 (the same rows again)
                    rows.put(f"{name}/seed1/plug_in", rows.get(f"{name}/seed0/plug_in"))
    summary = write_report(config, tmp_path / "run", tmp_path / "results")
    lines = {c["task"]: c for c in summary["claims"] if c["a"] == "prox-label/worst_owner"}
    assert set(lines) == {"piqa", "arc_easy", "all (mean over tasks)"}
    pooled = lines["all (mean over tasks)"]
    assert pooled["difference"] == pytest.approx((lines["piqa"]["difference"] + lines["arc_easy"]["difference"]) / 2)
    assert lines["arc_easy"]["difference"] == 0.0 and lines["piqa"]["verdict"] == "holds"
    assert pooled["tasks"] == ["piqa", "arc_easy"] and pooled["n"] == 2 * 600 and pooled["seeds"] == [2, 2]
    assert all(c["interval"] == "percentile" for c in lines.values())  # the worst owner stands out everywhere


def test_a_worst_owner_row_of_owners_with_few_items_stays_within_what_an_accuracy_can_be():
    import numpy as np

    from recipes.study.federation_report import owner_entry

    class Resolver:  # a label-skewed seed: owners holding 2 to 4 held-out items
        def groups(self, family):
            owners = [np.array([1.0, 0.0]), np.array([0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 1.0])]
            return [owners], [0], [[[0, 1], [0, 1, 1], [0, 1, 1, 0]]]

        def sources(self, family, seeds):
            return []

    entry = owner_entry("f/worst_owner", Resolver(), 300)
    assert entry["interval"] == "simultaneous" and entry["mean"] == 0.5
    assert entry["ci95"][0] == 0.0 and entry["ci95"][1] == 1.0  # the bands reach past both ends; cut there


def test_a_federations_mb_down_leaves_the_emulators_delivery_apart():
    """Two seeds of one federation move the same adapters; only the first found the owners' cache
    empty and paid the emulator's delivery in its first round. Their MB down must agree (before,
    the table mixed 361 MB of delivery into one seed: 198.5 MB against 19.7)."""
    from recipes.study.federation_report import federated_costs

    def seed(delivered: int) -> dict:
        rounds = [{"round": r, "bytes_up": 4_000_000, "bytes_down": 4_000_000 + (delivered if r == 1 else 0),
                   "emulator_bytes_down": delivered if r == 1 else 0, "seconds": 30.0, "train_loss": 1.0 / r}
                  for r in (1, 2)]
        return {"rounds": rounds, "bytes_up_total": 8_000_000, "bytes_down_total": 8_000_000 + delivered,
                "emulator_bytes": 360_000_000}

    entry = federated_costs([seed(361_000_000), seed(0)], None)
    assert entry["mb_down"] == pytest.approx(8.0) and entry["mb_up"] == pytest.approx(8.0)
    assert entry["emulator_mb"] == pytest.approx(360.0)  # what each owner receives once, beside the rounds


def test_a_federations_last_validation_loss_is_where_its_curve_ends():
    """The table's last val loss is the mean over seeds of the owners' validation loss after the
    final round (not the first round, not the training loss): two seeds ending at 6.0 and 7.0 read 6.5."""
    from recipes.study.federation_report import federated_costs, federation_markdown

    def seed(end: float) -> dict:
        rounds = [{"round": r, "bytes_up": 1, "bytes_down": 1, "seconds": 1.0, "train_loss": 9.0,
                   "client_val_loss": {1: 10.0, 2: 8.0, 3: end}[r]} for r in (1, 2, 3)]
        return {"rounds": rounds, "bytes_up_total": 3, "bytes_down_total": 3}

    entry = federated_costs([seed(6.0), seed(7.0)], None)
    assert entry["last_val_loss"] == pytest.approx(6.5)
    no_owner_eval = seed(6.0)
    for x in no_owner_eval["rounds"]:
        del x["client_val_loss"]
    assert "last_val_loss" not in federated_costs([no_owner_eval], None)  # a blank cell, not a made-up number
    summary = {"federations": {"f": {"piqa": entry}}, "rows": {}}
    assert federation_markdown(summary)[6].endswith("| 6.50 |")
    diverged = seed(float("nan"))
    assert math.isnan(federated_costs([seed(6.0), diverged], None)["last_val_loss"])  # shown, not dropped
    shorter = seed(7.0)
    shorter["rounds"] = shorter["rounds"][:2]  # a seed resumed with fewer rounds: its own last round (8.0)
    assert federated_costs([seed(6.0), shorter], None)["last_val_loss"] == pytest.approx(7.0)


def test_a_plan_shows_the_order_builds_last_runs_and_what_a_deadline_leaves(tmp_path, tiny_model_dir, capsys):
    """`--builds-last` and `--until` on a plan: the units that build nothing first, and the units
    that would not start before the deadline at the measured rate marked."""
    import datetime as dt

    (tmp_path / "model").symlink_to(tiny_model_dir)
    config = tmp_path / "study.toml"
    config.write_text(STUDY.format(out=tmp_path / "study", results=tmp_path / "results", model=tmp_path / "model"))
    other = tmp_path / "other" / "ledger"
    other.mkdir(parents=True)
    (other / "units.jsonl").write_text(json.dumps({"unit": "x", "seconds": 3.0, "cost": 1e6}) + "\n")
    plan = ["study", "--config", str(config), "--plan", "--rate-from", str(tmp_path / "other")]

    def lines(*extra: str) -> list[str]:
        assert main(plan + list(extra)) == 0
        return [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  piqa: ")
                or line.startswith("  stage 1")]

    grid_order = lines()
    assert [line.split(":")[1].strip() for line in grid_order][:2] == ["full zero-shot", "ot-distilled/seed0 zero-shot"]
    builds_last = lines("--builds-last")
    assert sorted(builds_last) == sorted(grid_order) and builds_last != grid_order
    built = [any(name in line for name in ("ot-distilled", "scaleot", "stage 1")) for line in builds_last]
    assert built == sorted(built) and 0 < sum(built) < len(built)  # (the attack is on ScaleOT's emulator)
    far = (dt.datetime.now() + dt.timedelta(days=2)).isoformat(timespec="minutes")
    assert not any(line.endswith("after the deadline") for line in lines("--until", far))
    # at a day per M block-token passes, no unit fits in the next two minutes
    (other / "units.jsonl").write_text(json.dumps({"unit": "x", "seconds": 86400.0, "cost": 1e6}) + "\n")
    soon = (dt.datetime.now() + dt.timedelta(minutes=2)).strftime("%H:%M")
    assert all(line.endswith("; after the deadline") for line in lines("--until", soon))
    assert main(["study", "--config", str(config), "--report-only", "--until", soon]) == 2
    assert "--report-only runs no unit" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_builds_last_runs_the_same_rows_in_another_order(tmp_path, tiny_model_dir, capsys):
    """The schedule changes when a unit runs, never what it computes: each unit is seeded by its own
    seed, so a study run builds-last scores every item as one run in the grid's order."""
    from recipes.study.ledger import compute_log

    (tmp_path / "model").symlink_to(tiny_model_dir)
    text = STUDY.replace("seeds = [0, 1]", "seeds = [0]").replace("full_finetune_lrs = [1e-4, 1e-3]\n", "")
    text = text.replace('attack_emulator = "scaleot"\nattack_lrs = [1e-5, 1e-3]\n', "")
    text = text[:text.index("[[claim]]", text.index("[[claim]]") + 1)]  # (the claim on full fine-tuning: none here)
    scores = {}
    for name, flags in (("grid", []), ("builds-last", ["--builds-last"])):
        config = tmp_path / f"{name}.toml"
        results = tmp_path / name / "results"
        config.write_text(text.format(out=tmp_path / name / "run", results=results, model=tmp_path / "model"))
        assert main(["study", "--config", str(config), "--no-progress"] + flags) == 0
        log = [e["unit"] for e in compute_log(results)]
        files = json.loads((results / "summary.json").read_text())["items_files"]["piqa"]
        scores[name] = (log, {row: json.loads(gzip.open(results / f, "rt").read())["loglik"] for row, f in files.items()})
    (grid_log, grid_scores), (last_log, last_scores) = scores["grid"], scores["builds-last"]
    assert sorted(grid_log) == sorted(last_log) and grid_log != last_log
    assert last_log.index("piqa: uniform seed 0 fine-tune + plug-in") < last_log.index("piqa: ot-distilled/seed0 zero-shot")
    assert grid_scores == last_scores and len(grid_scores) >= 6
    capsys.readouterr()
