"""Data owners' partitions ([partition] in a run file) against expectations derived by hand."""

import json
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
    if config.kind != "pathological":  # (a pathological split may leave labels nobody drew unused)
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
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, num, seed, kind="pathological",
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
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, 3, 11, kind="pathological", classes_per_client=2)
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
    while an owner has fewer than ``min_size`` items (the generator keeps its state)."""
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
    raise AssertionError("no draw satisfied min_size")


@pytest.mark.parametrize("alpha,seed", [(0.3, 0), (0.5, 42), (5.0, 7)])
def test_dirichlet_sizes_and_label_histograms_match_a_hand_derivation(tmp_path, alpha, seed):
    golds = GOLDS
    num, min_size = 4, 2
    parts = _partition(_task(tmp_path / "t.jsonl", golds), golds, num, seed, kind="dirichlet", alpha=alpha,
                       min_partition_size=min_size)
    expected = _dirichlet_by_hand(golds, num, alpha, min_size, seed)
    assert [len(p) for p in parts] == [len(e) for e in expected]
    assert [_histogram(p, golds) for p in parts] == [_histogram(e, golds) for e in expected]
    assert [sorted(p) for p in parts] == [sorted(e) for e in expected]
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_skews_labels_more_as_alpha_shrinks(tmp_path):
    """Mean total-variation distance of owners' label mix from the global mix, over 5 seeds."""
    golds = GOLDS
    task = _task(tmp_path / "t.jsonl", golds)
    overall = np.bincount(golds, minlength=3) / len(golds)

    def skew(alpha):
        distances = []
        for seed in range(5):
            for part in _partition(task, golds, 4, seed, kind="dirichlet", alpha=alpha):
                mix = np.bincount([golds[i] for i in part], minlength=3) / len(part)
                distances.append(0.5 * np.abs(mix - overall).sum())
        return float(np.mean(distances))

    assert skew(0.1) > skew(100.0)


def test_pathological_asking_for_more_labels_than_exist_is_a_config_error(tmp_path):
    golds = GOLDS
    with pytest.raises(ConfigError, match="cannot split"):
        _partition(_task(tmp_path / "t.jsonl", golds), golds, 3, kind="pathological", classes_per_client=4)
