"""Straightforward per-query reference implementations of the landmark metrics, from the revisitop and GLDv2
protocols.

They loop over queries and positions in plain Python, so they are slow but easy to check by eye; the vectorised
functions in ``advbct.evaluation`` are tested against them, and ``bench/`` measures the speed-up over them.
"""

from __future__ import annotations

PROTOCOL_LISTS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def reference_revisited(ranks, gnd, kappas=(1, 5, 10)):
    out = {}
    for protocol, (ok_keys, junk_keys) in PROTOCOL_LISTS.items():
        aps, precisions = [], {k: [] for k in kappas}
        for q, entry in enumerate(gnd):
            ok = {i for key in ok_keys for i in entry[key]}
            junk = {i for key in junk_keys for i in entry[key]}
            if not ok:
                continue
            ranking = [int(v) for v in ranks[q]]
            positions = []
            junk_seen = 0
            for position, image in enumerate(ranking):
                if image in ok:
                    positions.append(position - junk_seen)
                if image in junk:
                    junk_seen += 1
            ap = 0.0
            for j, r in enumerate(positions):
                p0 = 1.0 if r == 0 else j / r
                p1 = (j + 1) / (r + 1)
                ap += (p0 + p1) / 2 / len(ok)
            aps.append(ap)
            one_based = [r + 1 for r in positions]
            for k in kappas:
                kq = min(max(one_based), k)
                precisions[k].append(sum(1 for p in one_based if p <= kq) / kq)
        out[protocol] = {"map": 100 * sum(aps) / len(aps) if aps else float("nan")}
        for k in kappas:
            out[protocol][f"mp@{k}"] = 100 * sum(precisions[k]) / len(precisions[k]) if aps else float("nan")
    return out


def reference_gldv2(ranks, solution, k=100):
    total, scored = 0.0, 0
    for q, relevant in solution.items():
        if not relevant:
            continue
        relevant = set(relevant)
        seen, correct, ap = set(), 0, 0.0
        for i, image in enumerate(int(v) for v in ranks[q][:k]):
            if image in seen:
                continue
            seen.add(image)
            if image in relevant:
                correct += 1
                ap += correct / (i + 1)
        total += ap / min(len(relevant), k)
        scored += 1
    return 100 * total / scored
