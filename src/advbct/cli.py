"""``advbct``: one console script for the whole upgrade path.

Every training command takes a preset, an optional YAML file and dotted overrides (``-o optim.lr=0.05``), in
that order of precedence. Errors in user input are printed as one clear line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from advbct import backfill_study, pipeline
from advbct.backfill_study import StudyPlan
from advbct.cli_errors import errors, refused_as_exit
from advbct.compat import compared_methods, list_methods, method_info, methods_of_kind, radius_summary
from advbct.compat.advbct import PAPER_TAU
from advbct.config import list_presets
from advbct.data.download import download_gldv2, download_revisited
from advbct.distributed import current_world, init_from_environment, shutdown
from advbct.evaluation.backfill import MERGES, ORDER_POLICIES
from advbct.evaluation.landmarks import evaluate_benchmarks, parse_benchmarks
from advbct.evaluation.results import UPGRADE_PAIRS
from advbct.jobs import set_threads
from advbct.presets import quickstart_config, train_config
from advbct.quickstart import quickstart as run_quickstart
from advbct.reporting import comparison_table, print_report
from advbct.reporting.landmarks import print_landmark_report
from advbct.reporting.markdown import render as render_markdown
from advbct.reporting.run_info import run_info, write_run_info
from advbct.reporting.tables import backfill_policy_table
from advbct.serving.cli import backfill_cmd, index_app, rollback_cmd, serve_cmd, upgrade_cmd
from advbct.table_bench import SETTINGS, run_bench

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

PresetOpt = Annotated[str, typer.Option("--preset", help=f"built-in preset: {', '.join(list_presets())}")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config merged over the preset")]
OverrideOpt = Annotated[list[str] | None, typer.Option("--set", "-o", help="dotted override, e.g. optim.lr=0.05")]
DataOpt = Annotated[str | None, typer.Option("--data", help="data root (else $ADVBCT_DATA, ../shared/data)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
QuietOpt = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]
SplitOpt = Annotated[
    str, typer.Option("--split", help="test, or validation (training images no model trained on: choose recipes there)")
]
JobsOpt = Annotated[int, typer.Option("--jobs", min=1, help="new models trained at once (fills a GPU)")]


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _method_list(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Comma-separated method names plus ``extra``, each checked against the registry."""
    chosen = list(_comma_list(text))
    chosen += [m for m in extra if m not in chosen]
    unknown = [m for m in chosen if m not in list_methods()]
    if unknown:
        errors.print(f"[red]error:[/] unknown methods {unknown}; available: {', '.join(list_methods())}")
        raise typer.Exit(2)
    return chosen


def _run(fn, *args, **kwargs):
    with refused_as_exit():
        world = init_from_environment()
        console.quiet = not world.is_main
        set_threads()
        return fn(*args, **kwargs)


@app.command("train-old")
def train_old_cmd(
    out: Annotated[Path, typer.Option("--out", help="run folder")] = Path("runs/old"),
    preset: PresetOpt = "quickstart",
    config: ConfigOpt = None,
    overrides: OverrideOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    no_progress: QuietOpt = False,
) -> None:
    """Train the old model (classification) on the old part of the allocation."""
    cfg = _run(train_config, "old", preset, config, overrides, data, device)
    path = _run(pipeline.train_old, cfg, out, not no_progress)
    console.print(f"old model: {path}")


@app.command("stats")
def stats_cmd(
    old: Annotated[Path, typer.Option("--old", help="old model.pt")],
    out: Annotated[Path | None, typer.Option("--out", help="statistics file (default: beside --old)")] = None,
    allocation: Annotated[Path | None, typer.Option("--allocation")] = None,
    data: DataOpt = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
) -> None:
    """Old-class centres and radii (1.5 IQR rule), saved keyed to the old checkpoint."""
    stats, path = _run(pipeline.compute_statistics, old, out, data, allocation, device)
    summary = radius_summary(stats, PAPER_TAU)
    console.print(f"statistics for {summary.classes} old classes -> {path}")
    console.print(summary.describe() + " (AdvBCT's default tau; set it with compat.options.tau)")


@app.command("train-new")
def train_new_cmd(
    old: Annotated[Path | None, typer.Option("--old", help="old model.pt to stay compatible with")] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="statistics from `advbct stats`")] = None,
    method: Annotated[str, typer.Option("--method", help="compatibility method")] = "advbct",
    out: Annotated[Path, typer.Option("--out", help="run folder")] = Path("runs/new"),
    allocation: Annotated[Path | None, typer.Option("--allocation")] = None,
    preset: PresetOpt = "quickstart",
    config: ConfigOpt = None,
    overrides: OverrideOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    no_progress: QuietOpt = False,
) -> None:
    """Train a new model with a compatibility method (advbct, independent, ...)."""
    cfg = _run(train_config, "new", preset, config, [*(overrides or []), f"compat.method={method}"], data, device)
    needs_old = method_info(method).needs_old_model
    if stats is None and old is not None and (old.parent / "stats.pt").is_file() and needs_old:
        stats = old.parent / "stats.pt"
    path = _run(pipeline.train_new, cfg, out, old, stats, allocation, not no_progress)
    console.print(f"new model: {path}")


@app.command("eval")
def eval_cmd(
    old: Annotated[Path | None, typer.Option("--old", help="old model.pt")] = None,
    new: Annotated[Path | None, typer.Option("--new", help="new model.pt")] = None,
    independent: Annotated[Path | None, typer.Option("--independent", help="independent model.pt")] = None,
    query_model: Annotated[Path | None, typer.Option("--query-model", help="one test: the query side")] = None,
    gallery_model: Annotated[Path | None, typer.Option("--gallery-model", help="one test: the gallery side")] = None,
    benchmark: Annotated[
        str, typer.Option("--benchmark", help="cifar100, or roxford5k, rparis6k, gldv2 (comma-separated), paper")
    ] = "cifar100",
    out: Annotated[Path | None, typer.Option("--out", help="write the report as JSON")] = None,
    split: SplitOpt = "test",
    data: DataOpt = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    no_progress: QuietOpt = False,
) -> None:
    """Self and cross tests, P_up / P_comp / P_1 and the empirical criterion.

    Either one test (--query-model, --gallery-model) or the upgrade tests (--old, --new [--independent]). On the
    landmark benchmarks the paper's table takes Medium mAP (ROxford, RParis) and Private mAP@100 (GLDv2).
    """
    single = query_model is not None or gallery_model is not None
    if single and (query_model is None or gallery_model is None or old or new or independent):
        errors.print("[red]error:[/] give both --query-model and --gallery-model, and not --old/--new/--independent")
        raise typer.Exit(2)
    if not single and (old is None or new is None):
        errors.print("[red]error:[/] give --old and --new (or --query-model and --gallery-model for one test)")
        raise typer.Exit(2)
    if split != "test" and (single or benchmark != "cifar100"):
        errors.print("[red]error:[/] --split validation takes the upgrade tests (--old, --new) on cifar100")
        raise typer.Exit(2)
    if benchmark == "cifar100":
        if single:
            report = _run(pipeline.evaluate_one, query_model, gallery_model, data, device)
            console.print(report.to_json())
        else:
            report = _run(pipeline.evaluate, old, new, independent, data, device, split=split)
            print_report(report, console)
    else:
        names = _run(parse_benchmarks, benchmark)
        if single:
            models, tests = {"query": query_model, "gallery": gallery_model}, [("query", "gallery")]
        else:
            models = {"old": old, "new": new, **({"independent": independent} if independent else {})}
            tests = list(UPGRADE_PAIRS if independent else UPGRADE_PAIRS[:3])
        report = _run(evaluate_benchmarks, names, models, tests, data, device, not no_progress)
        print_landmark_report(report, console)
    if out is not None and current_world().is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_json(), indent=2))


@app.command("quickstart")
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", help="run folder; results.json is written there")] = Path(
        "runs/quickstart"
    ),
    preset: PresetOpt = "quickstart",
    config: ConfigOpt = None,
    overrides: OverrideOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    no_progress: QuietOpt = False,
) -> None:
    """The main job on CIFAR-100: an old model serving a Milvus gallery, AdvBCT trained, gated and put live at
    once, the gallery backfilled behind it; the offline table, the backfill curves and the verdict."""
    cfg = _run(quickstart_config, preset, config, overrides, data, device)
    _run(run_quickstart, cfg, out, console, not no_progress)
    if current_world().is_main:
        write_run_info(out)
    console.print(f"results: {out / 'results.json'}, plot: {out / 'backfill.png'}, gallery: {out / 'gallery'}")


@app.command("compare")
def compare_cmd(
    out: Annotated[Path, typer.Option("--out", help="run folder; results.json is written there")] = Path(
        "runs/compare"
    ),
    methods: Annotated[
        str, typer.Option("--methods", help="comma-separated methods (default: every baseline, advbct and its variant)")
    ] = ",".join(compared_methods()),
    ablations: Annotated[bool, typer.Option("--ablations", help="add the AdvBCT ablations")] = False,
    preset: PresetOpt = "quickstart",
    config: ConfigOpt = None,
    overrides: OverrideOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    no_progress: QuietOpt = False,
    jobs: JobsOpt = 1,
    split: SplitOpt = "test",
) -> None:
    """Train every method on one allocation and one seed set; one table, one results.json."""
    chosen = _method_list(methods, tuple(methods_of_kind("ablation")) if ablations else ())
    cfg = _run(quickstart_config, preset, config, overrides, data, device)
    reports = _run(pipeline.compare, cfg, out, chosen, console, not no_progress, jobs, split)
    title = f"{cfg.new.data.allocation}, {cfg.new.model.backbone}, seed {cfg.new.seed}, {split} split"
    console.print(comparison_table(reports, title))
    if current_world().is_main:
        results = {m: {**r.to_json(), "split": split} for m, r in reports.items()}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_run_info(out)
    console.print(f"results: {out / 'results.json'}")


@app.command("backfill-curves")
def backfill_curves_cmd(
    run: Annotated[Path, typer.Argument(help="a quickstart or compare run folder (old/, independent/, <method>/)")],
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="comma-separated methods studied (default: a quickstart's method, else advbct)"),
    ] = None,
    orders: Annotated[str, typer.Option("--orders", help="comma-separated order policies")] = ",".join(ORDER_POLICIES),
    merges: Annotated[str, typer.Option("--merges", help="raw (cosine), calibrated, or both")] = ",".join(MERGES),
    seed: Annotated[int, typer.Option("--seed", help="seed of the random order")] = 0,
    data: DataOpt = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    no_progress: QuietOpt = False,
) -> None:
    """Exact backfill curves of a run folder's models on the test split (0, 10, ..., 100% re-embedded): each order
    policy and merge (raw cosine, or calibrated on the validation split) for each method, random order for the
    independent model; writes RUN/backfill_study.json and prints one row per curve."""
    chosen = _method_list(methods or backfill_study.studied_by_default(run))
    merge_list = _comma_list(merges)
    plan = _run(StudyPlan, tuple(chosen), orders=_comma_list(orders), merges=merge_list, order_merges=merge_list,
                reference_merges=merge_list)  # fmt: skip
    study = _run(backfill_study.study_run_folder, run, plan, seed, data, device, console, not no_progress)
    console.print(backfill_policy_table(study))
    (run / "backfill_study.run.json").write_text(json.dumps(run_info(), indent=2))
    console.print(f"results: {run / 'backfill_study.json'}")


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run folders (quickstart, compare, backfill-curves)")],
    out: Annotated[Path | None, typer.Option("--out", help="write the Markdown there instead of printing it")] = None,
) -> None:
    """Markdown tables rendered from run folders' results, each with the commands and machine that made them."""
    text = _run(render_markdown, runs)
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)


@app.command("bench")
def bench_cmd(
    preset: Annotated[str, typer.Option("--preset", help="cifar100 (the paper setting) or smoke")] = "cifar100",
    out: Annotated[Path, typer.Option("--out", help="folder for runs, results.json, results.md and plots")] = Path(
        "runs/bench"
    ),
    settings: Annotated[
        str, typer.Option("--settings", help="comma-separated of extended-class, extended-data, extended-backbone")
    ] = ",".join(SETTINGS),
    methods: Annotated[str, typer.Option("--methods", help="comma-separated methods")] = ",".join(compared_methods()),
    overrides: OverrideOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    no_progress: QuietOpt = False,
    jobs: JobsOpt = 1,
) -> None:
    """The full comparison table: every method on every setting, one seed set; re-running skips finished runs."""
    chosen = _method_list(methods)
    picked = list(_comma_list(settings))
    _run(run_bench, preset, out, picked, chosen, overrides, data, device, console, not no_progress, jobs)
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, plots in {out}")


@app.command("download")
def download_cmd(
    name: Annotated[str, typer.Argument(help="roxford5k, rparis6k or gldv2")],
    root: Annotated[Path, typer.Option("--root", help="data root; files go to ROOT/<name>/")] = Path("data"),
    images: Annotated[bool, typer.Option("--images/--no-images", help="revisited: also the image archives")] = True,
    splits: Annotated[str, typer.Option("--splits", help="gldv2: comma-separated of train, index, test")] = (
        "index,test"
    ),
    max_archives: Annotated[
        int | None, typer.Option("--max-archives", help="gldv2: only the first N archives of each split")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="a mirror holding the official paths (default: the official sites)")
    ] = None,
) -> None:
    """Fetch a landmark benchmark's official files: resumable, checksum-verified, unpacked in place."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:

        def bar(label: str):
            task = progress.add_task(label, total=None)
            return lambda done, total: progress.update(task, completed=done, total=total)

        if name == "gldv2":
            chosen = _comma_list(splits)
            kwargs = {"base": base_url} if base_url else {}
            folder = _run(download_gldv2, root, chosen, max_archives, progress=bar, **kwargs)
        else:
            kwargs = {"gnd_base": base_url, "images_base": base_url} if base_url else {}
            folder = _run(download_revisited, name, root, images, progress=bar, **kwargs)
    console.print(f"{name}: {folder}  (evaluate with --data {root})")


@app.command("methods")
def methods_cmd() -> None:
    """List the registered compatibility methods: kind, what each needs, and its options."""
    for name in list_methods():
        info = method_info(name)
        needs = ", ".join(info.method.requires) or ("old model" if info.needs_old_model else "nothing")
        options = ", ".join(info.method.option_names()) or "none"
        console.print(f"{name} ({info.kind}) needs: {needs}; options: {options}", highlight=False)


app.add_typer(index_app, name="index")
app.command("upgrade")(upgrade_cmd)
app.command("rollback")(rollback_cmd)
app.command("backfill")(backfill_cmd)
app.command("serve")(serve_cmd)


def main() -> None:
    try:
        app()
    finally:
        shutdown()
