"""Markdown tables rendered from run folders' ``results.json`` (and ``backfill_study.json``), so the tables in
the docs are regenerated from the runs, never typed: ``advbct report RUN... > table.md``.

A run folder is recognised by what it holds: a quickstart's report (it has a ``gate``), ``advbct compare``'s
report (one entry per method), and an ``advbct backfill-curves`` study. Comparisons that share their split and
their old and independent models (candidates compared on the validation split, say) make one table; the same
comparison repeated over seed sets (other old models, one split and allocation) adds a summary table across them.
Each table is preceded by the commands that made its runs and the machine they ran on, from each folder's ``run.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from advbct.compat import CompatError, resolved_options
from advbct.evaluation.results import CROSS, OLD, LiveUpgradeReport, UpgradeReport
from advbct.reporting.run_info import read_run_info


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _seeds(run: Path) -> str:
    """The allocation and seeds of a run folder, from the configs its models were trained with."""
    old = _load(run / "old" / "config.json") or {}
    others = (_load(path) for path in sorted(run.glob("*/config.json")) if path.parent.name != "old")
    new = next((config for config in others if config), {})
    data = old.get("data", {})
    return (
        f"{data.get('allocation', '?')}, allocation seed {data.get('allocation_seed', '?')}, "
        f"old seed {old.get('seed', '?')}, new seed {new.get('seed', '?')}"
    )


def _provenance(runs: list[Path], info_file: str = "run.json") -> str:
    lines = []
    for run in runs:
        info = read_run_info(run) if info_file == "run.json" else _load(run / info_file)
        if info is None:
            lines.append(f"- `{run.name}`: {_seeds(run)} (no run.json: command not recorded)")
            continue
        machine = info["machine"]
        where = ", ".join(machine["gpus"]) or f"{machine['cpu']}, {machine['cores']} cores"
        lines.append(f"- `{info['command']}` ({_seeds(run)}; {where}; torch {info['torch']})")
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)])


def above_before_the_end(mine: dict, other: dict) -> bool:
    """Whether ``mine`` lies above ``other`` at every fraction below 1."""
    return all(a > b for f, a, b in zip(mine["fractions"], mine["map"], other["map"], strict=True) if f < 1)


def _quickstart_row(name: str, report: LiveUpgradeReport) -> list[str]:
    up, backfill, gate = report.upgrade, report.backfill, report.gate
    old, cross, new = up.old.map, up.cross.map, up.self_test.map
    curves = {model: c[backfill["headline"]] for model, c in backfill["curves"].items()}
    mine, other = curves[report.method], curves["independent"]
    decision = "passed" if gate["passed"] else "refused"
    return [
        name, report.method, f"{old:.2f}", f"{cross:.2f} ({cross - old:+.2f})", f"{new:.2f} ({new - old:+.2f})",
        f"{up.independent.map:.2f}", f"{up.independent_cross.map:.2f}",
        f"{decision} ({gate[CROSS]:.2f} vs {gate[OLD]:.2f})",
        f"{mine['auc_map']:.2f} / {other['auc_map']:.2f}", f"{mine['min_map']:.2f}",
        f"{mine['max_negative_flips']:.2f}", "yes" if above_before_the_end(mine, other) else "no",
    ]  # fmt: skip


def quickstart_markdown(runs: list[Path]) -> str:
    """One row per quickstart run: the tests, both margins, the gate and the headline backfill curves."""
    header = ["run", "method", "M(o,o)", "M(n,o) (margin)", "M(n,n) (margin)", "M(\\*,\\*)", "M(\\*,o)",
              "gate (validation)", "AUC method / independent", "lowest", "worst flips %",
              "above at every t < 1"]  # fmt: skip
    reports = [LiveUpgradeReport.from_json(_load(run / "results.json")) for run in runs]
    rows = [_quickstart_row(run.name, report) for run, report in zip(runs, reports, strict=True)]
    merge = reports[0].backfill["headline"]
    caption = f"mAP in percent, test split; backfill curves in {merge.replace('/', ' order, ')} merge."
    return "\n\n".join([_provenance(runs), _table(header, rows), caption])


def _method_label(run: Path, method: str) -> str:
    """A method's name with the compatibility options its run used where they differ from the method's defaults,
    so candidates of one method stay apart in one table and each label reads as the overrides that train it."""
    options = ((_load(run / method / "config.json") or {}).get("compat") or {}).get("options") or {}
    try:
        defaults = resolved_options(method, {})
    except CompatError:  # a method this version does not have: show what its run recorded
        defaults = {}
    changed = {key: value for key, value in options.items() if key not in defaults or defaults[key] != value}
    given = ", ".join(f"{key}={_yaml_scalar(value)}" for key, value in sorted(changed.items()))
    return f"{method} ({given})" if given else method


def _yaml_scalar(value: object) -> str:
    """An option's value as an override would spell it (``true``, ``0.5``, ``median``)."""
    return value if isinstance(value, str) else json.dumps(value)


def _split(results: dict) -> str:
    return next(iter(results.values())).get("split", "test")


def _allocation(run: Path) -> str | None:
    """The allocation a run's old model was trained on; None where its config is missing, since runs of unknown
    allocation cannot be said to repeat one comparison."""
    return ((_load(run / "old" / "config.json") or {}).get("data") or {}).get("allocation")


def _shared_key(run: Path) -> tuple:
    """What the rows of one table must share: the split, and the old model's allocation and the old and independent
    models' tests, which tell one seed set's models from another's."""
    results = _load(run / "results.json")
    first = UpgradeReport.from_json(next(iter(results.values())))
    return (_split(results), _allocation(run), first.old.map, first.independent.map if first.independent else None)


def _by_shared_models(runs: list[Path]) -> list[list[Path]]:
    """The runs grouped by :func:`_shared_key`, in the order first seen: each group is one seed set's comparison."""
    groups: dict[tuple, list[Path]] = {}
    for run in runs:
        groups.setdefault(_shared_key(run), []).append(run)
    return list(groups.values())


def compare_markdown(runs: list[Path]) -> str:
    """``advbct compare``'s table: one row per method (with the options its run was given), over one or more run
    folders that share their split and their old and independent models (candidates trained beside one another)."""
    rows, seen, first, split = [], set(), None, "test"
    for run in runs:
        results = _load(run / "results.json")
        split = _split(results)
        for method, data in results.items():
            report, label = UpgradeReport.from_json(data), _method_label(run, method)
            first = first or report
            if label not in seen:
                seen.add(label)
                p = report.p_scores
                rows.append([label, f"{report.self_test.map:.2f}", f"{report.cross.map:.2f}", f"{p.p_up:.2f}",
                             f"{p.p_comp:.2f}", f"{p.p_1:.2f}", "yes" if report.criterion.cross else "no"])  # fmt: skip
    labels = (("M(o,o)", first.old), ("M(\\*,\\*)", first.independent), ("M(\\*,o)", first.independent_cross))
    shared = ", ".join(f"{label} {test.map:.2f}" for label, test in labels)
    header = ["method", "M(n,n)", "M(n,o)", "P_up", "P_comp", "P_1", "M(n,o) > M(o,o)"]
    return "\n\n".join([_provenance(runs), _table(header, rows), f"mAP in percent, {split} split; {shared}."])


def study_markdown(run: Path) -> str:
    """A backfill study's curves: areas, lowest point and worst negative flips per model, order and merge."""
    study = _load(run / "backfill_study.json")
    header = ["model", "order", "merge", "AUC mAP", "AUC top-1", "lowest mAP", "worst flips %"]
    rows = []
    for model, curves in study["curves"].items():
        for key, c in curves.items():
            order, merge = key.split("/")
            rows.append([model, order, merge, f"{c['auc_map']:.2f}", f"{c['auc_top1']:.2f}", f"{c['min_map']:.2f}",
                         f"{c['max_negative_flips']:.2f}"])  # fmt: skip
    caption = f"Test split; M(o,o) {study['old_map']:.2f}; areas are means over 0, 10, ..., 100% re-embedded."
    return "\n\n".join([_provenance([run], "backfill_study.run.json"), _table(header, rows), caption])


def _seed_set(runs: list[Path]) -> dict[str, UpgradeReport]:
    """Every method of one seed set (folders sharing their old and independent models), by its row label: the
    label and not the bare name, so two candidates of one method are never averaged as one."""
    reports: dict[str, UpgradeReport] = {}
    for run in runs:
        for method, data in _load(run / "results.json").items():
            reports.setdefault(_method_label(run, method), UpgradeReport.from_json(data))
    return reports


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2f} ({min(values):.2f} to {max(values):.2f})"


def _times_best(label: str, seed_sets: list[dict[str, UpgradeReport]], score: Callable[[UpgradeReport], float]) -> str:
    """In how many seed sets ``label`` scores the highest of every method its comparison ran (a tie is a win for
    each tied method): a method that wins only on average has not beaten every baseline."""
    wins = sum(score(reports[label]) == max(map(score, reports.values())) for reports in seed_sets)
    return f"{wins}/{len(seed_sets)}"


def _summary_row(label: str, seed_sets: list[dict[str, UpgradeReport]]) -> list[str]:
    reports = [reports[label] for reports in seed_sets]
    passes = sum(report.criterion.cross for report in reports)
    return [
        label, _spread([r.self_test.map for r in reports]), _spread([r.cross.map for r in reports]),
        _spread([r.p_scores.p_1 for r in reports]), f"{passes}/{len(reports)}",
        _times_best(label, seed_sets, lambda r: r.cross.map), _times_best(label, seed_sets, lambda r: r.p_scores.p_1),
    ]  # fmt: skip


def seed_summary_markdown(runs: list[Path]) -> str:
    """One comparison repeated over seed sets (compare folders of one split and allocation whose old models
    differ) as one table: a claim such as "the method beats every baseline" must hold in each seed set, not in
    one. A row per method that every seed set ran; metric cells are the mean (lowest to highest)."""
    settings = {(_split(_load(run / "results.json")), _allocation(run)) for run in runs}
    if len(settings) != 1:
        named = "; ".join(f"{split} split, {allocation}" for split, allocation in sorted(settings, key=str))
        raise ValueError(f"a seed summary needs runs of one split and allocation, got {named}")
    split, allocation = settings.pop()
    seed_sets = [_seed_set(group) for group in _by_shared_models(runs)]
    labels = [label for label in seed_sets[0] if all(label in reports for reports in seed_sets)]
    header = ["method", "M(n,n)", "M(n,o)", "P_1", "cross test passes", "best M(n,o)", "best P_1"]
    firsts = [next(iter(reports.values())) for reports in seed_sets]
    old = sum(r.old.map for r in firsts) / len(firsts)
    independent = sum(r.independent.map for r in firsts) / len(firsts)
    caption = (
        f"mAP in percent, {split} split, {allocation}, {len(seed_sets)} seed sets: mean (lowest to highest); "
        f"mean M(o,o) {old:.2f}, mean M(\\*,\\*) {independent:.2f}; best: the seed sets in which the method is "
        "highest of every method its comparison ran, ties counting for each."
    )
    rows = [_summary_row(label, seed_sets) for label in labels]
    return "\n\n".join([_provenance(runs), _table(header, rows), caption])


def _comparison_tables(runs: list[Path]) -> list[str]:
    """A table per group of comparisons sharing split, old and independent models, then a seed summary per split
    and allocation that two or more such groups (seed sets) repeat."""
    comparisons = _by_shared_models(runs)
    repeated: dict[tuple, list[list[Path]]] = {}
    for group in comparisons:
        split, allocation = _shared_key(group[0])[:2]
        if allocation is not None:
            repeated.setdefault((split, allocation), []).append(group)
    summaries = [seed_summary_markdown([run for group in groups for run in group])
                 for groups in repeated.values() if len(groups) >= 2]  # fmt: skip
    return [compare_markdown(group) for group in comparisons] + summaries


def render(runs: list[Path]) -> str:
    """Every table the run folders hold: the quickstart runs as one table, then each comparison (and the seed
    summaries over them) and study."""
    missing = [str(r) for r in runs if not (r / "results.json").is_file() and not (r / "backfill_study.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no results.json or backfill_study.json in {', '.join(missing)}")
    quickstarts = [r for r in runs if "gate" in (_load(r / "results.json") or {})]
    parts = [quickstart_markdown(quickstarts)] if quickstarts else []
    parts += _comparison_tables([r for r in runs if r not in quickstarts and (r / "results.json").is_file()])
    parts += [study_markdown(run) for run in runs if (run / "backfill_study.json").is_file()]
    return "\n\n".join(parts) + "\n"
