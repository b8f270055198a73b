"""Data owners' partitions ([partition] in a run file) against expectations derived by hand."""

import json
import warnings
from collections import Counter

import numpy as np
import pytest

from scaleot_fed.errors import ConfigError
from simulations.config import fed_config_from_dict
from simulations.partition import partition_indices


def _task(path, golds) -> str:
    """A user task file whose item ``i`` has answer index ``golds[i]`` (four choices each)."""
    with open(path, "w") as handle:
        for i, gold in enumerate(golds):
            handle.write(json.dumps({"context": f"Q{i}?", "choices": ["a", "b", "c", "d"], "gold": int(gold)}) + "\n")
    return str(path)


def _partition(task, golds, num, seed=0, **section):
    config = fed_config_from_dict({"partition": section}).partition  # the [partition] table, as a run file has it
    parts = partition_indices(task, None, config, num, seed)
    everything = sorted(i for p in parts for i in p)
    assert len(set(everything)) == len(everything)  # no item in two partitions
    if config.classes_per_client is None:  # (a pathological split may leave labels nobody drew unused)
        assert everything == list(range(len(golds)))  # every item somewhere
    return parts


def _histogram(part, golds) -> dict:
    return dict(Counter(int(golds[i]) for i in part))


# 40 items, labels interleaved and unbalanced: 17 x gold 0, 14 x gold 1, 9 x gold 2
GOLDS = [0, 1, 2, 0, 1] * 6 + [0, 1, 0, 2] * 2 + [0, 2]


def test_iid_gives_contiguous_near_equal_shards(tmp_path):
    golds = [i % 4 for i in range(10)]
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, 3, kind="iid")
    # 10 items over 3 owners: the first 10 % 3 owners get one more
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_pathological_one_class_per_owner_gives_single_label_owners(tmp_path):
    """Flower's PathologicalPartitioner ("random" class assignment), re-derived: owner k in turn
    draws its labels with ``rng.choice(labels, classes_per_client, replace=False)``; a label's
    items (in file order) are split with ``np.array_split`` among the owners that drew it, in
    owner order."""
    golds = GOLDS
    num, seed, per_client = 4, 3, 1
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, num, seed, kind="label-skew",
                       classes_per_client=per_client)

    rng = np.random.default_rng(seed)
    labels = sorted(set(golds))
    drawn = [rng.choice(labels, size=per_client, replace=False).tolist() for _ in range(num)]
    expected = {k: [] for k in range(num)}
    for label in labels:
        owners = [k for k in range(num) if label in drawn[k]]
        if not owners:
            continue
        chunks = np.array_split(np.flatnonzero(np.array(golds) == label), len(owners))
        for owner, chunk in zip(owners, chunks):
            expected[owner] += chunk.tolist()
    used = {label for d in drawn for label in d}
    assert sorted(i for p in parts for i in p) == [i for i, g in enumerate(golds) if g in used]
    for k, part in enumerate(parts):
        assert sorted(part) == sorted(expected[k])
        # one label per owner, and it is the one the owner drew
        assert _histogram(part, golds) == {drawn[k][0]: len(expected[k])}


def test_pathological_with_two_classes_per_owner(tmp_path):
    golds = GOLDS
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, 3, 11, kind="label-skew", classes_per_client=2)
    rng = np.random.default_rng(11)
    drawn = [sorted(rng.choice([0, 1, 2], size=2, replace=False).tolist()) for _ in range(3)]
    totals = Counter(golds)
    users = Counter(label for d in drawn for label in d)
    for k, part in enumerate(parts):
        histogram = _histogram(part, golds)
        assert sorted(histogram) == drawn[k]
        for label, count in histogram.items():  # array_split: shares differ by at most one item
            assert count in (totals[label] // users[label], -(-totals[label] // users[label]))


def _dirichlet_by_hand(golds, num, alpha, min_size, seed):
    """Flower Datasets' DirichletPartitioner (self_balancing=True, shuffle=True), re-derived:
    per class in sorted order, draw proportions ~ Dir(alpha); owners already above the average
    size get none of it; cut the class's indices at ``floor(cumsum * n_class)``; redraw everything
    while an owner has fewer than ``min_size`` items (the generator keeps its state), 11 draws at
    most (None after that: Flower's partitioner gives up)."""
    rng = np.random.default_rng(seed)
    targets = np.array(golds)
    average = len(golds) / num
    for _ in range(11):
        owners = [[] for _ in range(num)]
        for label in sorted(set(golds)):
            members = np.flatnonzero(targets == label)
            shares = rng.dirichlet(np.full(num, float(alpha)))
            shares = np.where([len(o) > average for o in owners], 0.0, shares)
            shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for owner, chunk in zip(owners, np.split(members, cuts)):
                owner += chunk.tolist()
        if min(len(o) for o in owners) >= min_size:
            return owners
    return None


@pytest.mark.parametrize("alpha,seed", [(0.3, 0), (0.5, 42), (5.0, 7)])
def test_dirichlet_sizes_and_label_histograms_match_a_hand_derivation(tmp_path, alpha, seed):
    golds = GOLDS
    num, min_size = 4, 2
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, num, seed, kind="label-skew", alpha=alpha,
                       min_partition_size=min_size)
    expected = _dirichlet_by_hand(golds, num, alpha, min_size, seed)
    assert expected is not None
    assert [len(p) for p in parts] == [len(e) for e in expected]
    assert [_histogram(p, golds) for p in parts] == [_histogram(e, golds) for e in expected]
    assert [sorted(p) for p in parts] == [sorted(e) for e in expected]
    assert min(len(p) for p in parts) >= min_size


def test_a_dirichlet_split_flower_gives_up_on_is_drawn_again_from_seeds_derived_from_the_run_seed(tmp_path):
    """Two answer values, 8 owners, alpha 0.1 (PIQA's label skew): Flower's partitioner gives up on
    some seeds after 10 draws; the split starts it again at seeds derived from the run's seed
    (``SeedSequence([seed, restart])``), so the owners are the first derived draw that fits."""
    golds = [i % 2 for i in range(48)]
    num, alpha = 8, 0.1
    seed = next(s for s in range(200) if _dirichlet_by_hand(golds, num, alpha, 2, s) is None)
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, num, seed, kind="label-skew", alpha=alpha)
    derived = [int(np.random.SeedSequence([seed, r]).generate_state(1)[0]) for r in range(1, 10)]
    expected = next(e for s in derived if (e := _dirichlet_by_hand(golds, num, alpha, 2, s)) is not None)
    assert [sorted(p) for p in parts] == [sorted(e) for e in expected]
    assert min(len(p) for p in parts) >= 2


def test_a_dirichlet_minimum_no_draw_can_meet_is_one_line_saying_what_to_change(tmp_path):
    golds = [i % 2 for i in range(40)]  # 8 owners of 40 items: none can hold 6 each
    with pytest.raises(ConfigError, match=r"none of 110 Dirichlet draws .*raise alpha, lower min_partition_size"):
        _partition(_task(tmp_path / "t.jsonl", golds), golds, 8, kind="label-skew", alpha=0.1, min_partition_size=6)


def test_dirichlet_skews_labels_more_as_alpha_shrinks(tmp_path):
    """Mean total-variation distance of owners' label mix from the global mix, over 5 seeds."""
    golds = GOLDS
    task = _task(tmp_path / "t.jsonl", golds)
    overall = np.bincount(golds, minlength=3) / len(golds)

    def skew(alpha):
        distances = []
        for seed in range(5):
            for part in _partition(task, golds, 4, seed, kind="label-skew", alpha=alpha):
                mix = np.bincount([golds[i] for i in part], minlength=3) / len(part)
                distances.append(0.5 * np.abs(mix - overall).sum())
        return float(np.mean(distances))

    assert skew(0.1) > skew(100.0)


def test_pathological_asking_for_more_labels_than_exist_is_a_config_error(tmp_path):
    golds = GOLDS
    with pytest.raises(ConfigError, match="cannot split"):
        _partition(_task(tmp_path / "t.jsonl", golds), golds, 3, kind="label-skew", classes_per_client=4)


def _content_task(path, records) -> str:
    """A user task file: ``records`` are (gold, extra fields) pairs, two choices each."""
    with open(path, "w") as handle:
        for i, (gold, extra) in enumerate(records):
            handle.write(json.dumps({"context": f"Q{i}?", "choices": ["a", "b"], "gold": gold} | extra) + "\n")
    return str(path)


def test_items_carry_their_content_fields(tmp_path):
    from scaleot_fed.tasks import load_task

    path = _content_task(tmp_path / "t.jsonl", [(0, {"topic": "cooking", "year": 2020}), (1, {})])
    first, second = load_task(path, "train")
    assert dict(first.fields) == {"topic": "cooking", "year": "2020"} and dict(second.fields) == {}
    mixed = load_task("piqa+arc_easy", "validation", 3)
    assert [i.fields["task"] for i in mixed] == ["piqa"] * 3 + ["arc_easy"] * 3
    assert all(i.fields["source"] for i in mixed[3:])  # ARC's exam, from the question id
    with pytest.raises(ConfigError, match="distinct built-in tasks"):
        load_task("piqa+nosuchtask", "validation", 3)


def test_natural_partition_gives_each_value_its_own_owner(tmp_path):
    hospitals = ["north", "south", "east", "north", "east", "east", "south", "north", "north"]
    path = _content_task(tmp_path / "t.jsonl", [(i % 2, {"hospital": h}) for i, h in enumerate(hospitals)])
    parts = _partition(path, hospitals, 3, kind="natural", by="hospital")
    by_value = {hospitals[p[0]]: sorted(p) for p in parts}
    assert by_value == {"north": [0, 3, 7, 8], "south": [1, 6], "east": [2, 4, 5]}  # every value whole, alone
    with pytest.raises(ConfigError, match="set num_clients = 3"):
        _partition(path, hospitals, 4, kind="natural", by="hospital")
    with pytest.raises(ConfigError, match="needs `by`"):
        fed_config_from_dict({"partition": {"kind": "natural"}})


def test_named_tasks_split_each_task_evenly_among_its_holders(tmp_path):
    """Owner k holds the tasks it names; a task's items, shuffled with the seed, are cut into
    near-equal contiguous shares among its holders in owner order (re-derived here)."""
    tasks = ["piqa"] * 7 + ["arc"] * 4 + ["obqa"] * 3
    path = _content_task(tmp_path / "t.jsonl", [(0, {"task": t}) for t in tasks])
    owners = [["piqa"], ["piqa", "arc"], ["obqa", "arc"]]
    seed = 5
    config = fed_config_from_dict({"run": {"num_clients": 3, "clients_per_round": 2},
                                   "partition": {"kind": "task", "tasks": owners}})
    parts = partition_indices(path, None, config.partition, 3, seed)
    rng = np.random.default_rng(seed)
    expected = [[], [], []]
    for task in sorted(set(tasks)):  # arc, obqa, piqa
        holders = [k for k, names in enumerate(owners) if task in names]
        shares = np.array_split(rng.permutation([i for i, t in enumerate(tasks) if t == task]), len(holders))
        for k, share in zip(holders, shares):
            expected[k] += share.tolist()
    assert [sorted(p) for p in parts] == [sorted(e) for e in expected]
    assert {tasks[i] for i in parts[0]} == {"piqa"} and {tasks[i] for i in parts[2]} == {"obqa", "arc"}
    assert [len(p) for p in parts] == [4, 3 + 2, 3 + 2]  # piqa 7 -> 4 + 3, arc 4 -> 2 + 2
    with pytest.raises(ConfigError, match="one list per owner"):
        fed_config_from_dict({"run": {"num_clients": 4}, "partition": {"kind": "task", "tasks": owners}})
    bad = fed_config_from_dict({"run": {"num_clients": 3, "clients_per_round": 2}, "partition": {"kind": "task", "tasks": [["piqa"], ["arc"], ["x"]]}})
    with pytest.raises(ConfigError, match="not in this run's tasks"):
        partition_indices(path, None, bad.partition, 3, seed)


@pytest.mark.parametrize("kind,by", [("task", None), ("topic", "topic")])
def test_task_and_topic_skew_are_dirichlet_draws_over_the_field(tmp_path, kind, by):
    """Task and topic skew use Flower's Dirichlet partitioner over the content field: the same
    partition as a label skew over that field (checked by hand above), and more skewed owners as
    alpha shrinks."""
    field = by or "task"
    values = ["a", "b", "c", "d"] * 15
    path = _content_task(tmp_path / "t.jsonl", [(i % 2, {field: v}) for i, v in enumerate(values)])
    section = {"kind": kind, "alpha": 0.3} | ({"by": by} if by else {})
    skewed = _partition(path, values, 3, 2, **section)
    same = _partition(path, values, 3, 2, kind="label-skew", by=field, alpha=0.3)
    assert [sorted(p) for p in skewed] == [sorted(p) for p in same]

    def top_share(alpha):
        parts = _partition(path, values, 3, 2, **(section | {"alpha": alpha}))
        return np.mean([max(Counter(values[i] for i in p).values()) / len(p) for p in parts])

    assert top_share(0.05) > top_share(1000.0)


def test_old_kind_names_say_their_new_spelling():
    with pytest.raises(ConfigError, match='now spelled kind = "label-skew"'):
        fed_config_from_dict({"partition": {"kind": "dirichlet"}})
    with pytest.raises(ConfigError, match="classes_per_client"):
        fed_config_from_dict({"partition": {"kind": "pathological"}})


def test_a_skew_by_gold_warns_where_gold_is_only_the_answers_position(tmp_path):
    """Where every item has its own choices (ARC, PIQA) and the context does not list them, the
    model is trained and scored on the answer's text, never its index: a Dirichlet over ``gold``
    skews nothing it sees, and says so, once. Where the choices are one fixed label set (the
    helper's a-d) gold is a class, and where contexts list the choices the position is shown:
    no warning either way."""
    from simulations.partition import warn_if_position_skew

    def write(name, context, choices) -> str:
        with open(tmp_path / name, "w") as handle:
            for i, gold in enumerate(GOLDS):
                handle.write(json.dumps({"context": context(i), "choices": choices(i), "gold": int(gold)}) + "\n")
        return str(tmp_path / name)

    def skew(**section):
        return fed_config_from_dict({"partition": section}).partition

    label_skew = skew(kind="label-skew", alpha=1.0)
    varied = write("varied.jsonl", lambda i: f"Q{i}?", lambda i: [f"x{i}", f"y{i}", f"z{i}"])
    listed = write("listed.jsonl", lambda i: f"Q{i}? (A) x{i} (B) y{i} (C) z{i}", lambda i: [f"x{i}", f"y{i}", f"z{i}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # any of ours fails here
        warn_if_position_skew(_task(tmp_path / "fixed.jsonl", GOLDS), None, label_skew)
        warn_if_position_skew(listed, None, label_skew)
        warn_if_position_skew(varied, None, skew(kind="iid"))
    with pytest.warns(UserWarning, match="never sees.*kind = \"topic\""):
        warn_if_position_skew(varied, None, label_skew)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warn_if_position_skew(varied, None, label_skew)  # said once per task is enough
    topic_on_gold = write("varied2.jsonl", lambda i: f"Q{i}?", lambda i: [f"u{i}", f"v{i}", f"w{i}"])
    with pytest.warns(UserWarning, match="partition topic by 'gold'"):  # any Dirichlet over gold, not only label-skew
        warn_if_position_skew(topic_on_gold, None, skew(kind="topic", by="gold", alpha=1.0))
