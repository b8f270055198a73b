"""The verdict table across studies: generated from summaries, written between its markers."""

import json

import pytest

from recipes.study.verdicts import BEGIN, END, POOLED, verdict_table
from scaleot_fed.errors import ConfigError
from scaleot_fed_cli.main import main


def _claim(claim: str, mode: str, verdict: str, difference: float, task: str = POOLED, seeds=(3, 3)) -> dict:
    return {"claim": claim, "mode": mode, "task": task, "a": "x/plug_in", "b": "y", "kind": "greater", "margin": 0.0,
            "difference": difference, "ci95": [difference - 0.01, difference + 0.01], "n": 100, "seeds": list(seeds),
            "seeds_expected": [3, 3], "verdict": verdict}


def _summary(model: str, claims: list[dict], pending=()) -> dict:
    return {"model": model, "tasks": ["arc_easy", "piqa"], "modes": ["full", "lora"], "n_eval": {"arc_easy": 50},
            "eval_split": {"arc_easy": "test", "piqa": "validation"}, "claims": claims, "pending_claims": list(pending)}


def test_replicated_means_the_same_decided_verdict_on_every_model():
    a = _summary("m1", [_claim("beats", "full", "holds", 0.05), _claim("beats", "lora", "holds", 0.03),
                        _claim("close", "full", "does not hold", -0.04), _claim("beats", "full", "holds", 0.2, "piqa")])
    b = _summary("m2", [_claim("beats", "full", "holds", 0.02), _claim("beats", "lora", "inconclusive", 0.01),
                        _claim("close", "full", "does not hold", -0.03, seeds=(1, 3))], pending=["close [lora]"])
    table = {line.split(" | ")[0][2:] + "/" + line.split(" | ")[1]: line for line in verdict_table([a, b])
             if line.startswith("| ") and " | m1 | " not in line}
    assert table["beats/full"].endswith("| yes: holds on every model |")
    assert "+5.0 [+4.0, +6.0] **holds**" in table["beats/full"]  # the mean over tasks, not the piqa line
    assert table["beats/lora"].endswith("| no |")
    assert "(p)" in table["close/full"] and table["close/full"].endswith("| pending |")  # m2's side is provisional
    assert table["close/lora"].endswith("| pending |")
    b["mode_tasks"] = {"full": ["arc_easy"]}
    text = "\n".join(verdict_table([a, b]))
    # what each cell pools: every model's own tasks and splits, a mode's subset named
    assert "m1: arc_easy (test, n = 50), piqa (validation, n = -); m2: arc_easy (test, n = 50), piqa (validation, " \
           "n = -) (full: arc_easy only)." in text
    assert "**Reproduced** (holds on every model): beats (full)." in text
    assert "**Cannot tell** (decided on no model, or differently per model): beats (lora)" in text


def test_the_table_replaces_only_the_part_between_its_markers(tmp_path, capsys):
    for name, verdict in (("s1", "holds"), ("s2", "does not hold")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(_summary(name, [_claim("c", "full", verdict, 0.1)])))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{BEGIN}\nold table\n{END}\nafter\n")
    assert main(["verdicts", str(tmp_path / "s1"), str(tmp_path / "s2"), "--into", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"before\n{BEGIN}") and text.endswith(f"{END}\nafter\n") and "old table" not in text
    assert "| c | full |" in text and text.count(BEGIN) == 1
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ConfigError, match="needs one"):
        from recipes.study.verdicts import write_verdicts

        write_verdicts([str(tmp_path / "s1")], [str(tmp_path / "plain.md")])
    assert main(["verdicts", str(tmp_path / "missing")]) == 2
