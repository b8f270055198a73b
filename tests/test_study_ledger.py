"""The study's ledger (recipes.study.ledger): a fresh checkout gets its finished rows back from
the committed results, and only rows made with the same config."""

import gzip
import json

import pytest

from recipes.study import ledger
from scaleot_fed.errors import ConfigError
from scaleot_fed.rundir import RowCache


def _row(acc: float, **record) -> dict:
    items = {"loglik": [[-1.0, -2.0], [-3.0, -0.5]], "gold": [0, 1], "choice_chars": [[3, 4], [5, 6]]}
    return {"acc": acc, "acc_norm": acc / 2, "n": 2} | record | {"items": items}


def test_a_fresh_run_folder_gets_the_ledgers_rows_back(tmp_path):
    run, results, config = tmp_path / "run", tmp_path / "results", {"study": {"seeds": [0], "tasks": ["piqa"]}}
    rows = {"full_zero_shot": _row(0.5),
            "full_finetune/lr0.0001/seed0/row": _row(0.75, best_dev_loss=2.5, lr=1e-4, mode="full"),
            "u/seed0/emulator_finetune": _row(0.25, best_step=50), "u/seed0/plug_in": _row(0.5),
            "u/seed1/emulator_finetune": _row(0.25)}  # (its plug-in never finished)
    files = ledger.write_items(rows, results / "items" / "piqa")
    ledger.record(run, results, config)
    # the per-item file keeps the layout readers know, and the row's other fields under "record"
    stored = json.loads(gzip.open(results / files["full_finetune/lr0.0001/seed0/row"], "rt").read())
    assert stored["gold"] == [0, 1] and stored["acc"] == 0.75 and stored["record"]["best_dev_loss"] == 2.5
    logged = []
    assert ledger.restore(tmp_path / "fresh", results, config, ["piqa"], (), logged.append) == 4
    cache = RowCache(tmp_path / "fresh" / "piqa")
    for key in ("full_zero_shot", "full_finetune/lr0.0001/seed0/row", "u/seed0/emulator_finetune", "u/seed0/plug_in"):
        assert cache.get(key) == rows[key]  # every field, the items included
    # a fine-tuned emulator row without its plug-in stays out: the plug-in needs its trained
    # adapters, gone with the run folder, so its unit runs again
    assert cache.get("u/seed1/emulator_finetune") is None and "restored 4 finished rows" in logged[0]
    # rows already in the run folder win, and a second restore brings nothing
    cache.put("full_zero_shot", _row(0.1))
    assert ledger.restore(tmp_path / "fresh", results, config, ["piqa"], (), logged.append) == 0
    assert cache.get("full_zero_shot")["acc"] == 0.1


def test_a_ledger_made_with_another_config_is_refused(tmp_path):
    results, config = tmp_path / "results", {"study": {"seeds": [0], "train_limit": 100}}
    ledger.write_items({"full_zero_shot": _row(0.5)}, results / "items" / "piqa")
    ledger.record(tmp_path / "run", results, config)
    changed = {"study": {"seeds": [0], "train_limit": 200}}
    with pytest.raises(ConfigError, match=r"another config \(changed: study.train_limit\)"):
        ledger.restore(tmp_path / "fresh", results, changed, ["piqa"], (), print)
    assert not (tmp_path / "fresh").exists()
    # keys that only add to the grid may change
    more = {"study": {"seeds": [0, 1], "train_limit": 100}}
    assert ledger.restore(tmp_path / "fresh", results, more, ["piqa"], ("study.seeds",), print) == 1


def test_a_damaged_per_item_file_is_computed_again(tmp_path):
    results, config = tmp_path / "results", {"study": {}}
    files = ledger.write_items({"a/seed0/plug_in": _row(0.5), "b/seed0/plug_in": _row(0.5)}, results / "items" / "piqa")
    ledger.record(tmp_path / "run", results, config)
    path = results / files["a/seed0/plug_in"]
    path.write_bytes(path.read_bytes()[:20])  # cut short by a kill
    logged = []
    assert ledger.restore(tmp_path / "fresh", results, config, ["piqa"], (), logged.append) == 1
    assert "is damaged" in logged[0] and RowCache(tmp_path / "fresh" / "piqa").get("a/seed0/plug_in") is None
    # and written whole again from the row when the report next runs
    ledger.write_items({"a/seed0/plug_in": _row(0.5)}, results / "items" / "piqa")
    assert ledger.read_items(path)["acc"] == 0.5


def test_the_compute_log_and_records_outlive_the_run_folder(tmp_path):
    run, results = tmp_path / "run", tmp_path / "results"
    (run / "stage1" / "na2-a0.5" / "seed0").mkdir(parents=True)
    (run / "stage1" / "na2-a0.5" / "seed0" / "layer_replace.json").write_text('{"scores": {"1": 0.5}}')
    ledger.log_unit(results, "stage 1 seed 0", 30.0, 1e6)
    ledger.log_unit(results, "piqa: full zero-shot", 12.5, 2e5)
    records = ledger.record(run, results, {})
    assert json.loads((records / "stage1" / "na2-a0.5" / "seed0.json").read_text()) == {"scores": {"1": 0.5}}
    (run / "stage1" / "na2-a0.5" / "seed0" / "layer_replace.json").unlink()
    ledger.record(run, results, {})  # a record the run folder lost is kept
    assert (records / "stage1" / "na2-a0.5" / "seed0.json").is_file()
    assert ledger.compute_seconds(results) == 42.5
    assert [e["cost"] for e in ledger.compute_log(results)] == [1e6, 2e5]
    # a unit resumed after a stop counts what the stopped process did of it too
    ledger.log_unit(results, "piqa: a seed 0 fine-tune + plug-in", 10.0, 3e5, resumed=5.0)
    assert ledger.compute_seconds(results) == 57.5 and ledger.compute_log(results)[-1]["resumed_seconds"] == 5.0


def test_a_rebuild_keeps_the_first_builds_record_and_one_that_differs_is_refused(tmp_path):
    """Lost weights rebuilt from their seed: the same build keeps the recorded one (and its
    timing); another build (another torch, CPU or code) is refused, and never recorded over the
    build the rows were made with; a re-ranking of the same stage-1 run is recorded (with the
    first build's time)."""
    run, results = tmp_path / "run", tmp_path / "results"
    manifest = run / "emulators" / "seed1" / "ot" / "emulator" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    stage1 = run / "stage1" / "na2-a0.5" / "seed1" / "layer_replace.json"
    stage1.parent.mkdir(parents=True)

    def build(sha: str, seconds: float, history: list, scores: list) -> None:
        manifest.write_text(json.dumps({"weights_sha256": sha, "build_cost": {"seconds": seconds}}))
        stage1.write_text(json.dumps({"history": history, "scores": scores, "ranking_fit": {"seconds": seconds},
                                      "cost": {"seconds": seconds}}))

    def recorded() -> tuple[dict, dict]:
        return tuple(json.loads(p.read_text()) for p in (ledger.emulator_record(records, manifest),
                                                         ledger.stage1_record(records, stage1)))

    def check() -> bool:
        return ledger.check_rebuild(ledger.emulator_record(records, manifest), manifest, ledger.same_weights, "rows") \
            and ledger.check_rebuild(ledger.stage1_record(records, stage1), stage1, ledger.same_stage1, "rows")

    build("abc", 100.0, [1.0, 0.5], [3, 1])
    records = tmp_path / "ledger"
    assert not check()  # no record yet: nothing to compare
    records = ledger.record(run, results, {})
    assert check()
    build("abc", 250.0, [1.0, 0.5], [3, 1])  # the run folder lost, rebuilt the same (other timings)
    ledger.record(run, results, {})
    assert check() and [r["cost" if "cost" in r else "build_cost"]["seconds"] for r in recorded()] == [100.0, 100.0]
    assert recorded()[1]["ranking_fit"]["seconds"] == 100.0
    build("abc", 250.0, [1.0, 0.5], [1, 3])  # stage 1 ranked again (its RL run the same): recorded
    ledger.record(run, results, {})
    assert check() and recorded()[1]["scores"] == [1, 3] and recorded()[1]["cost"]["seconds"] == 100.0
    for sha, history in (("def", [1.0, 0.5]), ("abc", [1.0, 0.6])):  # rebuilt other weights, another run
        build(sha, 250.0, history, [1, 3])
        with pytest.raises(ConfigError, match=r"not the build the study's rows were made with.*\(rows\)"):
            check()
        ledger.record(run, results, {})  # (a report written meanwhile does not record it over the first)
        with pytest.raises(ConfigError):
            check()


def test_the_rows_made_from_an_emulator_are_named_by_globs_that_match_them():
    from fnmatch import fnmatch

    rows = ["ot__seed1__emulator_zero_shot", "ot__seed1__plug_in", "ot:full__seed1__plug_in",
            "ot__attack__lr0.0002__seed1__emulator_attack", "federated__seed1__plug_in", "centralised__seed1__gap",
            "federated:full__seed1__plug_in", "centralised:full__seed1__emulator_finetune"]
    other = ["ot__seed2__plug_in", "otx__seed1__plug_in", "full_finetune__lr0.0001__seed1__row", "federated__seed2__gap"]
    rows, other = ([r + ledger.ITEMS_SUFFIX for r in names] for names in (rows, other))
    globs = [g.removeprefix("items/*/") for g in ledger.row_globs("ot", 1, ["federated", "centralised"])]
    assert all(any(fnmatch(r, g) for g in globs) for r in rows)
    assert not any(fnmatch(r, g) for r in other for g in globs)
    shared = [g.removeprefix("items/*/") for g in ledger.row_globs("u", None)]
    assert all(any(fnmatch(r + ledger.ITEMS_SUFFIX, g) for g in shared)
               for r in ("u__emulator_zero_shot", "u__seed2__plug_in", "u:lora__seed0__gap"))
    assert not any(fnmatch("federated__seed1__plug_in" + ledger.ITEMS_SUFFIX, g) for g in shared)


def test_a_build_set_aside_keeps_the_rows_made_from_it_while_they_are_unchanged(tmp_path):
    results = tmp_path / "results"
    records = results / "ledger"
    record = records / "emulators" / "seed1" / "ot.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"weights_sha256": "old"}))
    rows = [results / "items" / "piqa" / f"ot__seed1__{r}{ledger.ITEMS_SUFFIX}" for r in ("plug_in", "emulator_zero_shot")]
    rows[0].parent.mkdir(parents=True)
    for path in rows:
        path.write_bytes(b"a row")
    current = tmp_path / "manifest.json"
    current.write_text(json.dumps({"weights_sha256": "new"}))
    kept = ledger.set_aside(records, record, current, rows)
    assert kept == records / "earlier_builds" / "emulators" / "seed1" / "ot.build1.json"
    assert json.loads(kept.read_text())["weights_sha256"] == "old" and record.read_text() == current.read_text()
    rows[0].write_bytes(b"the row computed again, on the new build")
    (found,) = ledger.earlier_builds(records)
    assert found == {"record": "earlier_builds/emulators/seed1/ot.build1.json",
                     "rows_made": ["items/piqa/ot__seed1__emulator_zero_shot" + ledger.ITEMS_SUFFIX]}
    # the study moves again, the new build rebuilt differently too: the rows the first build
    # holds are not the second's
    newer = tmp_path / "manifest2.json"
    newer.write_text(json.dumps({"weights_sha256": "newer"}))
    second = ledger.set_aside(records, record, newer, rows)
    assert second.name == "ot.build2.json" and json.loads(second.read_text())["weights_sha256"] == "new"
    assert list(json.loads(second.read_text())["rows_made"]) == ["items/piqa/ot__seed1__plug_in" + ledger.ITEMS_SUFFIX]
    # a record set aside once (a kill before its replacement was written) is not set aside twice
    record.write_text(json.dumps({"weights_sha256": "new"}))
    assert ledger.set_aside(records, record, newer, rows) == second and len(ledger.earlier_builds(records)) == 2


def test_a_row_of_an_emulator_set_aside_with_its_stage1_is_listed_once_with_the_emulator(tmp_path):
    results = tmp_path / "results"
    records = results / "ledger"
    rows = [results / "items" / "piqa" / f"{e}__seed1__plug_in{ledger.ITEMS_SUFFIX}" for e in ("s", "t")]
    rows[0].parent.mkdir(parents=True)
    for path in rows:
        path.write_bytes(path.name.encode())
    stage1, emulator = records / "stage1" / "na4-a0.5" / "seed1.json", records / "emulators" / "seed1" / "s.json"
    for record, made in ((stage1, rows), (emulator, rows[:1])):  # t's emulator rebuilt the same: not set aside
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"build": "old"}))
        current = tmp_path / f"{record.stem}-new.json"
        current.write_text(json.dumps({"build": "new"}))
        ledger.set_aside(records, record, current, made)
    emulator, stage1 = ledger.earlier_builds(records)
    assert emulator == {"record": "earlier_builds/emulators/seed1/s.build1.json",
                        "rows_made": [str(rows[0].relative_to(results))]}
    # the stage 1 keeps the row of the emulator that was not set aside (its rebuild matched)
    assert stage1 == {"record": "earlier_builds/stage1/na4-a0.5/seed1.build1.json",
                      "rows_made": [str(rows[1].relative_to(results))], "listed_with_emulators": 1}
    from recipes.study.markdown import _earlier_builds

    (line,) = [x for x in _earlier_builds({"earlier_builds": [emulator, stage1]}) if x.startswith("| earlier_builds/stage1")]
    assert "1 on piqa: t/seed1/plug_in; 1 more listed with the emulators built from it" in line
