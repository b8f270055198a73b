import json

import pytest
import torch

from scaleot_fed.errors import ScaleOTError
from scaleot_fed.evaluate import (
    accuracy_from_scores,
    encode_pair,
    evaluate_multiple_choice,
    loglikelihoods,
    make_request,
)
from scaleot_fed.tasks import TASKS, MCItem, load_mc_file, load_task

from .conftest import tiny_model


def test_acc_and_acc_norm_on_a_hand_computed_case():
    items = [
        MCItem("q1", ("a", "bbbb"), gold=1),  # scores -2, -4: acc picks a (wrong); norm -2/1 vs -4/4=-1 -> bbbb (right)
        MCItem("q2", ("xx", "y", "zzz"), gold=0),  # -1, -3, -6: acc xx (right); norm -.5, -3, -2 -> xx (right)
        MCItem("q3", ("p", "q"), gold=1),  # -5, -1: acc q (right); norm q (right)
    ]
    scores = [[-2.0, -4.0], [-1.0, -3.0, -6.0], [-5.0, -1.0]]
    result = accuracy_from_scores(items, scores)
    assert result == {"acc": 2 / 3, "acc_norm": 1.0, "n": 3}


def test_encode_pair_moves_trailing_spaces_to_the_continuation(gpt2_tokenizer):
    ctx, cont = encode_pair(gpt2_tokenizer, "Question: sky?\nAnswer: ", "blue")
    assert gpt2_tokenizer.decode(ctx) == "Question: sky?\nAnswer:"
    assert gpt2_tokenizer.decode(cont) == " blue"
    assert ctx + cont == gpt2_tokenizer("Question: sky?\nAnswer: blue")["input_ids"]


def test_long_context_is_truncated_on_the_left(gpt2_tokenizer):
    context = " ".join(["word"] * 100)
    request, targets = make_request(gpt2_tokenizer, context, " end", max_length=16)
    assert len(request.input_ids) == 16 and request.cont_len == len(targets) == 1
    with pytest.raises(ScaleOTError, match="does not fit"):
        make_request(gpt2_tokenizer, "ctx", " " + " ".join(["long"] * 40), max_length=16)


@torch.no_grad()
def test_batched_loglikelihoods_match_one_at_a_time(gpt2_tokenizer):
    model = tiny_model("gpt2", num_layers=2, vocab_size=len(gpt2_tokenizer))
    pairs = [("The cat sat on the", " mat"), ("Hello", " world, friend"), ("A much longer context sentence here", " yes")]
    batched = loglikelihoods(model, gpt2_tokenizer, pairs, batch_size=3)
    for (ctx, cont), score in zip(pairs, batched):
        c, x = encode_pair(gpt2_tokenizer, ctx, cont)
        ids = torch.tensor([c + x])
        logp = torch.log_softmax(model(ids).logits[0], -1)
        expected = sum(float(logp[len(c) - 1 + k, t]) for k, t in enumerate(x))
        assert score == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_evaluate_matches_acc_and_acc_norm_scored_by_hand(gpt2_tokenizer):
    """Score every choice by hand, one sequence at a time, by lm-eval's rules (continuation
    ``" " + choice``, summed log-probabilities of its tokens; acc_norm divides by the choice's
    length in characters) and compare with the batched evaluation."""
    tok = gpt2_tokenizer
    model = tiny_model("gpt2", num_layers=2, vocab_size=len(tok))
    items = [
        MCItem("Question: 2+2?\nAnswer:", ("4", "five hundred and twelve"), 0),
        MCItem("Sky is", ("blue", "green", "a very deep shade of red"), 2),
        MCItem("The capital of France is", ("Paris", "Lyon"), 0),
        MCItem("Question: pick one\nAnswer:", ("x", "an extremely long answer here", "yes"), 1),
        MCItem("Cats say", ("meow", "woof woof woof woof"), 0),
        MCItem("One, two,", ("three", "3", "many more numbers follow"), 2),
        MCItem("Water is", ("wet", "dry as a desert in summer"), 1),
        MCItem("Hello", ("world", "there", "my dear old friend"), 1),
    ]
    acc = acc_norm = 0
    choices_differ = 0
    for item in items:
        scores = []
        for choice in item.choices:
            ctx = tok(item.context)["input_ids"]
            whole = tok(item.context + " " + choice)["input_ids"]
            assert whole[: len(ctx)] == ctx
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
        normed = [sc / len(c) for sc, c in zip(scores, item.choices)]
        for values in (scores, normed):  # clear winners: float rounding of the batch cannot flip them
            top = sorted(values, reverse=True)
            assert top[0] - top[1] > 1e-3
        best, best_norm = max(range(len(scores)), key=scores.__getitem__), max(range(len(normed)), key=normed.__getitem__)
        acc += best == item.gold
        acc_norm += best_norm == item.gold
        choices_differ += best != best_norm
    assert choices_differ > 0  # the case tells acc from acc_norm
    result = evaluate_multiple_choice(model, tok, items, batch_size=3)
    assert result == {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ScaleOTError) as info:
        load_task("squad")
    assert all(name in str(info.value) for name in TASKS)


def test_user_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"context": "Q?", "choices": ["a", "b"], "gold": 1}) + "\n")
    assert load_task(str(good)) == [MCItem("Q?", ("a", "b"), 1)]
    csv_file = tmp_path / "good.csv"
    csv_file.write_text('context,choices,gold\n"Q2?","[""x"", ""y"", ""z""]",2\n')
    assert load_mc_file(csv_file) == [MCItem("Q2?", ("x", "y", "z"), 2)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "Q?", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(ScaleOTError, match="gold index 2 is out of range"):
        load_task(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ScaleOTError, match="no items"):
        load_task(str(empty))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"context": "Q?", "gold": 0}) + "\n")
    with pytest.raises(ScaleOTError, match="choices"):
        load_task(str(missing))


def test_sciq_has_no_train_split():
    with pytest.raises(ScaleOTError, match="no train split"):
        load_task("sciq", "train")


@pytest.mark.parametrize(
    "task,n_train,n_val",
    [("piqa", 16113, 1838), ("arc_easy", 2251, 570), ("arc_challenge", 1119, 299), ("openbookqa", 4957, 500)],
)
def test_builtin_task_sizes_and_formats(task, n_train, n_val):
    train, val = load_task(task, "train"), load_task(task, "validation")
    assert (len(train), len(val)) == (n_train, n_val)
    for item in train[:50] + val[:50]:
        assert not item.context.endswith(" ")
        if task in ("piqa", "arc_easy", "arc_challenge"):
            assert item.context.startswith("Question: ") and item.context.endswith("\nAnswer:")
        else:  # OpenBookQA: the bare stem, as lm-eval has it
            assert "Answer:" not in item.context
    assert load_task(task, "validation", limit=7) == val[:7]


def test_hellaswag_and_sciq_validation():
    hs = load_task("hellaswag", "validation", limit=20)
    assert all(len(i.choices) == 4 and "[" not in i.context for i in hs)
    sciq = load_task("sciq", "validation")
    assert len(sciq) == 1000 and all(i.gold == 3 for i in sciq[:10])


def test_a_sampled_limit_draws_a_fixed_content_keyed_sample(tmp_path):
    from scaleot_fed.tasks import sample_items

    items = [MCItem(f"Question: item {i}\nAnswer:", ("yes", "no"), i % 2) for i in range(200)]
    drawn = sample_items(items, 40, seed=0)
    assert len(set(drawn)) == 40 and set(drawn) <= set(items)
    assert drawn == sample_items(items, 40, seed=0) != sample_items(items, 40, seed=1)
    assert drawn != items[:40] and max(items.index(i) for i in drawn) > 100  # from the whole file
    assert drawn == sample_items(items[::-1], 40, seed=0)  # keyed by content: the file's order does not matter
    assert sample_items(items, 60, seed=0)[:40] == drawn  # a larger draw extends a smaller one
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold}) + "\n"
                            for i in items))
    assert load_task(str(path), "validation", 40, sample_seed=0) == drawn
    assert load_task(str(path), "validation", 40) == items[:40]  # lm-eval's --limit without a seed


def test_the_anchors_test_splits_load_whole_deduplicated_and_in_lm_evals_prompts():
    """lm-eval scores ARC and OpenBookQA on their labelled test splits: every doc once (the file
    holds several requests per doc), in file order, re-templated like the training items."""
    from scaleot_fed.tasks import ANCHOR_SPLITS

    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}
    for task, n in sizes.items():
        items = load_task(task, "test")
        assert len(items) == n and ANCHOR_SPLITS[task] == "test"
        assert len({(i.context, i.choices) for i in items}) >= n - 2  # (ARC repeats a question or two)
    arc = load_task("arc_easy", "test", limit=1)[0]
    assert arc.context.startswith("Question: Which statement best explains why photosynthesis") and arc.gold == 0
    assert arc.context.endswith("\nAnswer:") and arc.fields["source"] == "Mercury"
    obqa = load_task("openbookqa", "test", limit=3)
    assert not any(i.context.startswith("Question: ") for i in obqa)  # the bare stem, as lm-eval prompts it
    assert ANCHOR_SPLITS["piqa"] == ANCHOR_SPLITS["hellaswag"] == "validation"
    with pytest.raises(ScaleOTError, match="no labelled test split"):
        load_task("piqa", "test")


def test_the_gemma_alias_resolves_offline_from_its_part_wheels(tmp_path, monkeypatch):
    """`gemma3-270m`: four part wheels joined once into the cache, checked against the recorded
    sha256; its config (Gemma 3, 18 blocks) is read from the GGUF without converting anything."""
    from scaleot_fed import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    gguf, name = models._gguf_of(models.GEMMA3_ALIAS)
    assert gguf == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf" and name == models.GEMMA3_ALIAS
    assert models._gguf_of(models.GEMMA3_ALIAS)[0] == gguf  # joined once
    config = models.load_model_config(models.GEMMA3_ALIAS)
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert not (tmp_path / "models").exists()  # nothing converted
    gguf.unlink()
    (tmp_path / "gguf" / ".gemma-3-270m-q4_k_m.gguf.partial").write_bytes(b"left by a crash")
    assert models._gguf_of(models.GEMMA3_ALIAS)[0] == gguf and gguf.stat().st_size > 200e6  # a stale partial is rewritten


def test_an_alias_whose_parts_do_not_join_to_the_recorded_file_is_refused(tmp_path, monkeypatch):
    import hashlib

    from scaleot_fed import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    for i, part in enumerate(("p1", "p2")):  # two fake part wheels and the checksum wheel
        (tmp_path / part / "data").mkdir(parents=True)
        (tmp_path / part / "data" / f"m.gguf.part0{i}").write_bytes(b"abc"[i:i + 1] * 10)
    (tmp_path / "sums" / "data").mkdir(parents=True)
    good = hashlib.sha256(b"a" * 10 + b"b" * 10).hexdigest()
    monkeypatch.setattr(models, "package_dir", lambda package, hint: tmp_path / package)
    alias = models._Alias("sums", "pip install ...", "a test model", add_bos=True, parts=("p1", "p2"))
    (tmp_path / "sums" / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  m.gguf\n")
    with pytest.raises(ScaleOTError, match="joined from 2 parts has sha256"):
        models._alias_gguf(alias)
    assert not (tmp_path / "cache" / "gguf" / "m.gguf").exists()  # nothing half-checked left in place
    (tmp_path / "sums" / "data" / "SHA256SUMS").write_text(f"{good}  m.gguf\n")
    assert models._alias_gguf(alias).read_bytes() == b"a" * 10 + b"b" * 10
