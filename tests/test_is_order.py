"""The order IS cuts its splits from (evaluate.adm `IS_ORDERS`, `class_order`; evaluate.suite; `evaluate
--is-order`): `as-given` against the float64 restatement of ADM's compute_inception_score in the stored order,
`shuffled` against the same restatement on the seeded permutation, on class-sorted batches of several splits;
the class-order criterion; the warning; the flag's error."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ddt_export.core.errors import ArtifactError, ConfigError, InputError
from ddt_export.evaluate import adm as A, suite as S
from ddt_export.evaluate.fid import Stats

from engines_cache import run_cli
from references.adm import ref_inception_score
from test_evaluate import DIM, by_hand, graph  # noqa: F401  (graph: the fixture)
from test_fid import digit_images

CLASSES, PER_CLASS, SPLIT = 20, 60, 200  # 1200 images, 6 splits of 200: each sorted split sees 3-4 classes
GAP = 6.0  # logit of the image's own class above N(0, 1) noise: each class confidently predicted


def confident_logits(labels: np.ndarray, rng, classes: int = CLASSES) -> np.ndarray:
    """(N,) labels -> (N, classes) float64 logits whose argmax is the label for almost every image."""
    z = rng.standard_normal((len(labels), classes))
    z[np.arange(len(labels)), labels] += GAP
    return z


def sorted_batch(seed: int = 0, classes: int = CLASSES, per_class: int = PER_CLASS):
    """(labels, logits) of a batch stored class by class, as DDT's official sampler writes it."""
    labels = np.repeat(np.arange(classes), per_class)
    return labels, confident_logits(labels, np.random.default_rng(seed), classes)


# --------------------------------------------------------------------------------------- the two orders


def test_as_given_is_adms_number_in_the_stored_order():
    _, logits = sorted_batch()
    got, splits = A.ordered_inception_score(logits, "as-given", split_size=SPLIT)
    assert splits == 6
    assert got == pytest.approx(ref_inception_score(logits, SPLIT), rel=1e-12)
    assert got == A.inception_score(logits, SPLIT)[0]  # the unchanged ADM function, bit for bit


def test_shuffled_is_the_restatement_on_the_seeded_permutation():
    _, logits = sorted_batch()
    perm = np.random.default_rng(0).permutation(len(logits))  # the documented order, restated
    assert A.IS_SEED == 0 and A.IS_ORDER == "shuffled"
    np.testing.assert_array_equal(A.split_order(len(logits)), perm)
    got, splits = A.ordered_inception_score(logits, split_size=SPLIT)  # the default order
    assert splits == 6
    assert got == pytest.approx(ref_inception_score(logits[perm], SPLIT), rel=1e-12)
    other = A.ordered_inception_score(logits, "shuffled", seed=1, split_size=SPLIT)[0]
    perm1 = np.random.default_rng(1).permutation(len(logits))
    assert other == pytest.approx(ref_inception_score(logits[perm1], SPLIT), rel=1e-12)


def test_shuffled_is_much_higher_on_a_sorted_batch():
    _, logits = sorted_batch()
    given = A.ordered_inception_score(logits, "as-given", split_size=SPLIT)[0]
    shuffled = A.ordered_inception_score(logits, "shuffled", split_size=SPLIT)[0]
    one_split = A.inception_score(logits, len(logits))[0]  # the whole batch at once: order-free
    # each sorted split sees 3-4 of the 20 classes; a shuffled split sees all of them
    assert given < 4.5 and shuffled > 3 * given, (given, shuffled)
    assert shuffled == pytest.approx(one_split, rel=0.05)


def test_orders_agree_in_expectation_on_an_unsorted_batch():
    """Images in a random class order: the stored order is itself a random one, so both orders estimate the same
    expectation. Paired over 30 batches, the mean difference is within 4 standard errors of 0."""
    diffs, scores = [], []
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        logits = confident_logits(rng.integers(0, CLASSES, CLASSES * PER_CLASS), rng)
        given = A.ordered_inception_score(logits, "as-given", split_size=SPLIT)[0]
        shuffled = A.ordered_inception_score(logits, "shuffled", split_size=SPLIT)[0]
        diffs.append(shuffled - given)
        scores.append(given)
    d = np.array(diffs)
    assert abs(d.mean()) < 4 * d.std(ddof=1) / np.sqrt(len(d)), d
    assert np.abs(d).max() < 0.05 * np.mean(scores)  # and each pair is close


def test_one_split_the_order_changes_only_rounding():
    _, logits = sorted_batch()
    given, shuffled = (A.ordered_inception_score(logits, o)[0] for o in A.IS_ORDERS)  # 1200 < 5000: one split
    assert shuffled == pytest.approx(given, rel=1e-12)


def test_bad_order_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^--is-order: expected shuffled \| as-given, got sorted$"):
        A.check_is_order("sorted")
    with pytest.raises(ConfigError, match="--is-order"):
        A.ordered_inception_score(np.zeros((3, 2)), "as_given")
    with pytest.raises(ConfigError, match="--is-order"):  # before any file is read
        S.evaluate_paths("no-such-samples.npz", "no-such-ref.npz", is_order="random")


# --------------------------------------------------------------------------------------- class order


def test_class_order_criterion():
    rng = np.random.default_rng(0)
    labels, logits = sorted_batch()
    n, k = len(labels), CLASSES
    co = A.class_order(labels, "labels")
    # the closed forms of the module doc: r = (N - K) / (N - 1), e = (n - 1) / (N - 1), g = 1 - (K - 1) / (N - n)
    assert co.same_neighbours == pytest.approx((n - k) / (n - 1))
    assert co.random_expected == pytest.approx((PER_CLASS - 1) / (n - 1))
    assert co.grouping == pytest.approx(1 - (k - 1) / (n - PER_CLASS)) and co.sorted
    assert A.class_order(labels[::-1].copy(), "labels").sorted  # descending: grouped all the same
    assert A.class_order(logits.argmax(1), "predictions").sorted  # from the classifier alone
    noisy = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))  # 40% of predictions replaced at random
    assert A.class_order(noisy, "predictions").sorted
    shuffled = A.class_order(labels[rng.permutation(n)], "labels")
    assert not shuffled.sorted and abs(shuffled.grouping) < 0.1
    cycled = A.class_order(np.arange(n) % k, "labels")  # what `generate` and validate write: no neighbour alike
    assert cycled.same_neighbours == 0 and cycled.grouping < 0 and not cycled.sorted
    one = A.class_order(np.full(50, 3), "labels")  # one class: every order is the same
    assert one.grouping is None and not one.sorted
    assert A.class_order(np.array([1]), "labels").record()["same_class_neighbours"] is None
    with pytest.raises(InputError, match="integers"):
        A.class_order(logits, "predictions")


# --------------------------------------------------------------------------------------- the suite


def stats_only(dim: int) -> S.Batch:
    return S.Batch("ref.npz", None, Stats(np.zeros(dim), np.eye(dim), source="ref.npz"), None,
                   {"images": "ref.npz holds statistics only"})


def side(logits: np.ndarray, labels: np.ndarray | None, source: str = "samples.npz") -> S.Batch:
    pool = np.random.default_rng(1).standard_normal((len(logits), 4))
    b = S.batch_from_activations(A.Activations(pool, None, logits), source)
    return dataclasses.replace(b, labels=labels)


def test_suite_warns_on_a_sorted_batch_of_several_splits():
    labels, logits = sorted_batch(classes=10, per_class=1200)  # 12000 images: 3 splits of up to 5000
    said = []
    nums = S.adm_numbers(side(logits, labels), stats_only(4), say=said.append)
    given = A.ordered_inception_score(logits, "as-given")[0]
    shuffled = A.ordered_inception_score(logits, "shuffled")[0]
    assert nums["inception_score"] == shuffled and nums["inception_score_splits"] == 3
    assert nums["is_order"] == {"order": "shuffled", "seed": 0, "how": "numpy default_rng(0).permutation(N)"}
    assert nums["class_order"]["samples"]["sorted"] and nums["class_order"]["samples"]["source"] == "labels (arr_1)"
    assert nums["class_order"]["reference"] is None  # statistics only
    assert len(said) == 1 and "samples.npz is sorted by class" in said[0], said
    assert f"as given (ADM's number) {given:.4f}" in said[0] and f"shuffled (seed 0) {shuffled:.4f}" in said[0]
    assert shuffled > 2 * given  # each split sees 3-4 of the 10 classes
    assert "(3 splits of up to 5000, shuffled, seed 0)" in S.format_numbers(nums)[0]

    said.clear()  # as asked: ADM's number, still warned
    nums = S.adm_numbers(side(logits, labels), stats_only(4), "as-given", say=said.append)
    assert nums["inception_score"] == given and nums["is_order"]["seed"] is None
    assert len(said) == 1 and said[0].endswith("reported: as-given")
    assert "(3 splits of up to 5000, as given)" in S.format_numbers(nums)[0]

    said.clear()  # no labels: the classifier's argmax tells
    nums = S.adm_numbers(side(logits, None), stats_only(4), say=said.append)
    assert nums["class_order"]["samples"]["source"].startswith("predicted classes") and len(said) == 1

    perm = np.random.default_rng(7).permutation(len(labels))  # stored shuffled: no warning
    said.clear()
    nums = S.adm_numbers(side(logits[perm], labels[perm]), stats_only(4), say=said.append)
    assert said == [] and not nums["class_order"]["samples"]["sorted"]


def test_suite_does_not_warn_with_one_split():
    labels, logits = sorted_batch()  # sorted, but 1200 images: one split, the order cannot matter
    said = []
    nums = S.adm_numbers(side(logits, labels), stats_only(4), say=said.append)
    assert said == [] and nums["class_order"]["samples"]["sorted"]


def test_validate_section_records_the_order():
    rng = np.random.default_rng(3)
    acts = {k: A.Activations(rng.standard_normal((40, 4)), None, rng.standard_normal((40, 10)))
            for k in ("engine", "reference")}
    sec = S.validate_section(acts, None, {}, {"precision": None, "recall": None})
    for k in ("engine", "reference"):
        assert sec[k]["is_order"]["order"] == "shuffled" and sec[k]["is_order"]["seed"] == 0
    is_line = next(ln for ln in S.summary_lines(sec) if "Inception Score" in ln)
    assert is_line.endswith("(splits shuffled, seed 0)"), is_line


# --------------------------------------------------------------------------------------- the command


def test_cli_is_order(graph, tmp_path):  # noqa: F811
    """An .npz of 10001 images stored with sorted labels (arr_1): a warning on stderr, the order printed and in
    the JSON; `--is-order as-given` is the restatement in the stored order; a bad value is one line, exit 2."""
    n = 10_001  # 3 splits of up to 5000
    images, labels = digit_images(n, seed=20), np.repeat(np.arange(10), 1001)[:n]
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=labels)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(DIM), sigma=np.eye(DIM))
    logits = by_hand(images, graph)["logits"]
    code, text = run_cli(["evaluate", tmp_path / "samples.npz", tmp_path / "stats.npz", "--json", tmp_path / "s.json"])
    assert code == 0, text
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["is_order"]["order"] == "shuffled" and rec["class_order"]["samples"]["sorted"]
    assert "samples.npz is sorted by class (labels (arr_1)" in " ".join(text.split())
    assert f"Inception Score: {rec['inception_score']:.4f} (3 splits of up to 5000, shuffled, seed 0)" in text
    perm = np.random.default_rng(0).permutation(n)
    assert rec["inception_score"] == pytest.approx(ref_inception_score(logits[perm]), rel=1e-5)

    code, text = run_cli(["evaluate", tmp_path / "samples.npz", tmp_path / "stats.npz", "--is-order", "as-given",
                          "--json", tmp_path / "g.json"])
    assert code == 0, text
    rec = json.loads((tmp_path / "g.json").read_text())
    assert rec["is_order"]["order"] == "as-given" and "(3 splits of up to 5000, as given)" in text
    assert rec["inception_score"] == pytest.approx(ref_inception_score(logits), rel=1e-5)

    code, text = run_cli(["evaluate", tmp_path / "samples.npz", tmp_path / "stats.npz", "--is-order", "sorted"])
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in text, text
    assert lines[0] == "error: ConfigError: --is-order: expected shuffled | as-given, got sorted", lines


def test_labels_must_match_the_images(graph, tmp_path):  # noqa: F811
    np.savez(tmp_path / "bad.npz", arr_0=digit_images(12), arr_1=np.arange(11))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(DIM), sigma=np.eye(DIM))
    with pytest.raises(ArtifactError, match=r"arr_1: expected \(12,\) integer labels"):
        S.evaluate_paths(tmp_path / "bad.npz", tmp_path / "stats.npz")
