"""`jlstm report`: the paper's tables with our figures beside them, from MLflow only.

Our figure for a row is `metrics.VIDEO_TOP1_VOTE` (the paper's rule: the clips' vote) of the
last epoch of each finished run behind it, the mean over the splits run, with its spread
(the sample standard deviation over those splits) and the number of splits behind it. A
row whose runs have not finished says "not run"; the comparison systems of Table 1 are the
paper's reference figures, not ours. The rows are a pure function of the paper's tables
and a list of run figures (`report_rows`), so they are tested without Ray or MLflow; the
report is printed as Markdown and logged on the reproduce parent run as Markdown and PNG.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from orchestration import tracking
from tune_spaces.paper import METRIC, TABLES, PaperTable

KIND_TAG = "jlstm.kind"
REPRODUCE_KIND = "reproduce"  # the parent run of `jlstm reproduce` in its experiment
REPORT_DIR = "report"
MARKDOWN_FILE = "paper_tables.md"
PNG_FILE = "paper_tables.png"
NOT_RUN = "not run"
REFERENCE = "reference"
COLUMNS = ("row", "dataset", "paper %", "ours %", "spread", "ours - paper", "splits")
DPI = 100
ROW_INCHES = 0.28  # one table line in the PNG
TITLE_INCHES = 0.6
PNG_WIDTH_INCHES = 12.0


@dataclass(frozen=True)
class RunFigure:
    """One finished run's figure: `value` is its last epoch's METRIC (a fraction)."""

    dataset: str
    split: int
    variant: str
    value: float
    run_id: str = ""


@dataclass(frozen=True)
class ReportRow:
    """One (paper row, dataset) line of the report; figures in percent."""

    table: int
    label: str
    dataset: str
    variant: str | None
    paper: float
    ours: float | None  # mean over `splits_run`; None when none ran (or a reference row)
    spread: float | None  # sample standard deviation over `splits_run`; None below 2
    splits_run: tuple[int, ...]
    splits_wanted: tuple[int, ...]

    @property
    def reference(self) -> bool:
        return self.variant is None

    @property
    def difference(self) -> float | None:
        return None if self.ours is None else self.ours - self.paper

    def cells(self) -> tuple[str, ...]:
        """The row's cells under COLUMNS."""
        if self.reference:
            return (self.label, self.dataset, f"{self.paper:.1f}", REFERENCE, "", "", "")
        splits = f"{len(self.splits_run)}/{len(self.splits_wanted)}"
        if self.ours is None:
            return (self.label, self.dataset, f"{self.paper:.1f}", NOT_RUN, "", "", splits)
        spread = "" if self.spread is None else f"±{self.spread:.1f}"
        return (self.label, self.dataset, f"{self.paper:.1f}", f"{self.ours:.1f}", spread,
                f"{self.difference:+.1f}", splits)


def report_rows(tables: Iterable[PaperTable], figures: Sequence[RunFigure]) -> list[ReportRow]:
    """Every (row, dataset) with a paper figure, ours from `figures` beside it.

    A run several rows share (HMDB51 late fusion on split 1 is behind Tables 1-4) counts
    in each of them; a figure of a split a row does not cover is not used for that row.
    """
    by_key = {(f.dataset, f.split, f.variant): f.value for f in figures}
    rows = []
    for table in tables:
        for row in table.rows:
            for dataset, paper in row.figures.items():
                if paper is None:
                    continue
                ran = tuple(s for s in row.splits if (dataset, s, row.variant) in by_key)
                values = [100.0 * by_key[(dataset, s, row.variant)] for s in ran]
                rows.append(ReportRow(
                    table=table.number, label=row.label, dataset=dataset, variant=row.variant,
                    paper=paper,
                    ours=statistics.fmean(values) if values and not row.reference else None,
                    spread=statistics.stdev(values) if len(values) > 1 else None,
                    splits_run=ran if not row.reference else (),
                    splits_wanted=row.splits,
                ))
    return rows


def to_markdown(rows: Sequence[ReportRow], tables: Iterable[PaperTable]) -> str:
    """One Markdown table per paper table, under its number and the paper's caption."""
    parts = [
        f"Ours: {METRIC} (video top-1, clips vote) of each run's last epoch, mean over the "
        "splits run; spread: standard deviation over splits; splits: run / the paper's.",
    ]
    for table in tables:
        lines = [r.cells() for r in rows if r.table == table.number]
        parts.append(f"\n### Table {table.number}: {table.caption} ({table.note})\n")
        parts.append("| " + " | ".join(COLUMNS) + " |")
        parts.append("|" + "|".join(["---", "---", *["---:"] * 4, "---:"]) + "|")
        parts.extend("| " + " | ".join(cells) + " |" for cells in lines)
    return "\n".join(parts) + "\n"


def plot_report(
    rows: Sequence[ReportRow], tables: Sequence[PaperTable], path: str | Path
) -> Path:
    """The report's tables drawn as one PNG (Figure + Agg: safe in any thread, no display)."""
    sizes = [sum(r.table == t.number for r in rows) + 1 for t in tables]
    height = sum(TITLE_INCHES + ROW_INCHES * n for n in sizes)
    fig = Figure(figsize=(PNG_WIDTH_INCHES, max(height, 1.0)), dpi=DPI)
    axes = fig.subplots(len(tables), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [TITLE_INCHES / ROW_INCHES + n
                                                       for n in sizes]})
    for ax, table in zip(axes[:, 0], tables, strict=True):
        ax.axis("off")
        cells = [list(r.cells()) for r in rows if r.table == table.number]
        ax.set_title(f"Table {table.number}: {table.caption} ({table.note})", loc="left",
                     fontsize=10)
        drawn = ax.table(cellText=cells or [[""] * len(COLUMNS)], colLabels=list(COLUMNS),
                         loc="upper center", cellLoc="left",
                         colWidths=[0.34, 0.08, 0.08, 0.1, 0.08, 0.12, 0.07])
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8)
        for (line, _), cell in drawn.get_celld().items():
            if line > 0 and cells and cells[line - 1][3] == NOT_RUN:
                cell.set_text_props(color="grey")
    path = Path(path)
    fig.savefig(path)
    return path


def find_parent(experiment_id: str) -> str | None:
    """The experiment's reproduce parent run (the newest, should there be several)."""
    found = tracking.search_runs(
        experiment_id, tags={KIND_TAG: REPRODUCE_KIND}, newest_first=True, max_results=1
    )
    return found[0].info.run_id if found else None


def read_figures(experiment_id: str, parent_id: str) -> list[RunFigure]:
    """The figures of the parent's finished child runs (final model logged: FINISHED_TAG)."""
    runs = tracking.search_runs(experiment_id, parent_run_id=parent_id, status="FINISHED")
    figures = {}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if tracking.FINISHED_TAG not in tags or METRIC not in metrics:
            continue
        key = (tags["dataset"], int(tags["split"]), tags["variant"])
        # MLflow's latest value of a metric is its highest step: the last epoch.
        figures[key] = RunFigure(*key, value=float(metrics[METRIC]), run_id=run.info.run_id)
    return list(figures.values())


@dataclass
class Report:
    """What `jlstm report` prints and logs."""

    experiment: str
    parent_run_id: str | None
    rows: list[ReportRow]
    markdown: str


def build_report(experiment: str, table_numbers: Sequence[int] | None = None) -> Report:
    """The report of `experiment`'s reproduce runs (every row "not run" without a parent)."""
    tracking.connect()
    experiment_id = tracking.experiment_id_of(experiment)
    parent = find_parent(experiment_id) if experiment_id else None
    figures = read_figures(experiment_id, parent) if experiment_id and parent else []
    tables = [TABLES[n] for n in (table_numbers or sorted(TABLES))]
    rows = report_rows(tables, figures)
    return Report(experiment, parent, rows, to_markdown(rows, tables))


def log_report(report: Report, table_numbers: Sequence[int] | None = None) -> None:
    """The report as Markdown and PNG artifacts (`report/`) of its parent run."""
    if report.parent_run_id is None:
        return
    tables = [TABLES[n] for n in (table_numbers or sorted(TABLES))]
    with tempfile.TemporaryDirectory() as tmp:
        markdown = Path(tmp) / MARKDOWN_FILE
        markdown.write_text(report.markdown)
        png = plot_report(report.rows, tables, Path(tmp) / PNG_FILE)
        tracking.log_artifacts(report.parent_run_id, [markdown, png], REPORT_DIR)
