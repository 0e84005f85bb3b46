"""revisited_map and gldv2_map: hand-worked cases and property tests against the per-query references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advbct.evaluation import gldv2_map, revisited_map
from reference_landmarks import reference_gldv2, reference_revisited


def test_revisited_hand_example_with_junk_above_and_below_and_a_query_without_hard_images():
    # Query 0 ranks: 3, 0(easy), 5(junk), 1(hard), 2, 4(junk).
    # Medium: ok {0, 1}; after removing junk above them, 0 sits at rank 1 and 1 at rank 2:
    #   AP = [(0/1 + 1/2)/2 + (1/2 + 2/3)/2] / 2 = 0.41667; positives at 1-based ranks 2, 3:
    #   mP@1 = 0/1, mP@5 = mP@10 = 2/3 (k is cut to the last positive, 3).
    # Easy: ok {0}, junk {5, 4, 1}: 0 at rank 1: AP = (0 + 1/2)/2 = 0.25, mP@5 = 1/2.
    # Hard: ok {1}, junk {5, 4, 0}: two junk above it, rank 1: AP = 0.25, mP@5 = 1/2.
    # Query 1 finds its two easy images first: AP 1 everywhere it is scored; it has no hard image, so the Hard
    # protocol leaves it out.
    gnd = [
        {"bbx": [0, 0, 1, 1], "easy": [0], "hard": [1], "junk": [5, 4]},
        {"bbx": [0, 0, 1, 1], "easy": [2, 4], "hard": [], "junk": []},
    ]
    ranks = torch.tensor([[3, 0, 5, 1, 2, 4], [2, 4, 0, 1, 3, 5]])
    out = revisited_map(ranks, gnd)
    assert out["medium"]["map"] == pytest.approx(100 * (0.25 + (0.5 + 2 / 3) / 2) / 2 / 2 + 50)
    assert out["medium"]["mp@1"] == pytest.approx(50.0)
    assert out["medium"]["mp@5"] == pytest.approx((200 / 3 + 100) / 2)
    assert out["medium"]["mp@10"] == pytest.approx((200 / 3 + 100) / 2)
    assert out["easy"]["map"] == pytest.approx((25 + 100) / 2)
    assert out["easy"]["mp@5"] == pytest.approx((50 + 100) / 2)
    assert out["hard"]["map"] == pytest.approx(25.0)
    assert out["hard"]["mp@1"] == pytest.approx(0.0)
    assert out["hard"]["mp@5"] == pytest.approx(50.0)
    _same(out, reference_revisited(ranks, gnd))


def test_revisited_junk_below_every_positive_changes_nothing():
    ranks = torch.tensor([[0, 1, 2, 3]])
    with_junk = revisited_map(ranks, [{"easy": [0, 2], "hard": [], "junk": [3]}])
    without = revisited_map(ranks, [{"easy": [0, 2], "hard": [], "junk": []}])
    assert with_junk["easy"] == pytest.approx(without["easy"])
    # 0 at rank 0: (1 + 1)/2; 2 at rank 2: (1/2 + 2/3)/2; over 2 positives.
    assert with_junk["easy"]["map"] == pytest.approx(100 * (1 + (0.5 + 2 / 3) / 2) / 2)


def test_revisited_all_queries_without_positives_give_nan():
    out = revisited_map(torch.tensor([[0, 1]]), [{"easy": [], "hard": [], "junk": [1]}])
    assert all(math.isnan(v) for protocol in out.values() for v in protocol.values())


def test_revisited_rejects_bad_rankings():
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="rows"):
        revisited_map(torch.tensor([[0, 1], [1, 0]]), gnd)
    with pytest.raises(ValueError, match="integer"):
        revisited_map(torch.tensor([[0.0, 1.0]]), gnd)
    with pytest.raises(ValueError, match="outside"):
        revisited_map(torch.tensor([[0, 2]]), gnd)
    with pytest.raises(ValueError, match="database index"):
        revisited_map(torch.tensor([[0, 1]]), [{"easy": [5], "hard": [], "junk": []}])


@st.composite
def revisited_cases(draw):
    db = draw(st.integers(1, 30))
    queries = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(db, generator=gen) for _ in range(queries)])
    gnd = []
    for _ in range(queries):
        # Each database image is easy, hard, junk or unrelated; the lists may overlap when asked to.
        kind = torch.randint(0, 4, (db,), generator=gen)
        entry = {key: torch.nonzero(kind == i).flatten().tolist() for i, key in enumerate(("easy", "hard", "junk"))}
        if draw(st.booleans()):
            extra = torch.randint(0, db, (2,), generator=gen).tolist()
            entry["junk"] = sorted(set(entry["junk"]) | set(extra))
        gnd.append(entry)
    return ranks, gnd


def _same(a, b):
    for protocol in a:
        for key in a[protocol]:
            x, y = a[protocol][key], b[protocol][key]
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), (protocol, key, x, y)


@settings(max_examples=150, deadline=None)
@given(revisited_cases())
def test_revisited_matches_the_reference(case):
    ranks, gnd = case
    _same(revisited_map(ranks, gnd), reference_revisited(ranks, gnd))


def test_gldv2_hand_example_with_duplicates_and_an_unscored_query():
    # Query 0 (relevant 2, 5): 5 hits at 1 (P 1/1), the repeated 5 is skipped but holds rank 2, 3 misses,
    # 2 hits at 4 (P 2/4): AP = (1 + 0.5) / min(2, 4) = 0.75. Query 2 (relevant 7): hit at 2: AP = 0.5.
    # Query 1 has no solution list and is not scored.
    ranks = torch.tensor([[5, 5, 3, 2], [2, 5, 7, 1], [1, 7, 7, 0]])
    solution = {0: [2, 5], 2: [7]}
    assert gldv2_map(ranks, solution, k=4) == pytest.approx(100 * (0.75 + 0.5) / 2)
    # k = 1: query 0 hits at 1 and divides by min(2, 1) = 1; query 2 misses.
    assert gldv2_map(ranks, solution, k=1) == pytest.approx(50.0)
    assert gldv2_map(ranks, {**solution, 1: []}, k=4) == pytest.approx(62.5)


def test_gldv2_rejects_bad_input():
    ranks = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="no query"):
        gldv2_map(ranks, {0: []})
    with pytest.raises(ValueError, match="query row"):
        gldv2_map(ranks, {3: [0]})
    with pytest.raises(ValueError, match="k must"):
        gldv2_map(ranks, {0: [0]}, k=0)


@st.composite
def gldv2_cases(draw):
    n_index = draw(st.integers(1, 40))
    queries = draw(st.integers(1, 8))
    width = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # Predictions drawn with replacement, so duplicates are common.
    ranks = torch.randint(0, n_index, (queries, width), generator=gen)
    solution = {}
    for q in range(queries):
        if draw(st.booleans()) or not solution:
            count = int(torch.randint(1, n_index + 1, (1,), generator=gen))
            solution[q] = torch.randperm(n_index, generator=gen)[:count].tolist()
    k = draw(st.integers(1, width + 2))
    return ranks, solution, k


@settings(max_examples=150, deadline=None)
@given(gldv2_cases())
def test_gldv2_matches_the_reference(case):
    ranks, solution, k = case
    assert gldv2_map(ranks, solution, k) == pytest.approx(reference_gldv2(ranks, solution, k), abs=1e-9)
