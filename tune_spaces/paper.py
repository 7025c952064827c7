"""The paper's result tables as data (Wu et al. 2016, section 5, Tables 1-4).

Each row is one figure per dataset, in percent video top-1 accuracy, with the variant of
MODEL_SPEC section 6 that reproduces it (None for a comparison system of Table 1, which
is a reference figure only) and the splits the paper's figure covers (the three-split
average, or one split). `jlstm reproduce` schedules the runs behind a table's rows and
`jlstm report` sets our figures beside these; both read the tables from here only.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.metrics import VIDEO_TOP1_VOTE

DATASETS = ("ucf101", "hmdb51")
ALL_SPLITS = (1, 2, 3)
# The paper's rule: the video's label is the vote of its clips (MODEL_SPEC "prediction"),
# scored on the run's last epoch.
METRIC = VIDEO_TOP1_VOTE


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table: its label, the variant behind it, the paper's figures."""

    label: str
    variant: str | None  # None: a comparison system, shown as a reference figure
    figures: dict[str, float | None]  # dataset -> percent; None: the paper gives none
    splits: tuple[int, ...] = ALL_SPLITS  # the splits the paper's figure is over

    @property
    def reference(self) -> bool:
        return self.variant is None


@dataclass(frozen=True)
class PaperTable:
    """A paper table: its number, the paper's caption, what its figures cover, its rows."""

    number: int
    caption: str
    note: str
    rows: tuple[PaperRow, ...]

    @property
    def datasets(self) -> tuple[str, ...]:
        """The datasets any row of the table has a figure for, in DATASETS order."""
        return tuple(
            d for d in DATASETS if any(r.figures.get(d) is not None for r in self.rows)
        )

    def variants(self) -> tuple[str, ...]:
        """The variants our runs reproduce, in row order, each once."""
        return tuple(dict.fromkeys(r.variant for r in self.rows if r.variant))


def _both(ucf101: float | None, hmdb51: float | None) -> dict[str, float | None]:
    return {"ucf101": ucf101, "hmdb51": hmdb51}


def _hmdb(figure: float) -> dict[str, float | None]:
    return {"hmdb51": figure}


TABLES: dict[int, PaperTable] = {
    1: PaperTable(1, "Comparison with the state-of-art models.", "average of 3 splits", (
        PaperRow("Two-stream Conv net [15]", None, _both(88.0, 61.4)),
        PaperRow("Soft attention [14]", None, _both(None, 41.3)),
        PaperRow("Multi-skip Feature Stacking [8]", None, _both(None, 65.1)),
        PaperRow("LRCN [2]", None, _both(82.9, None)),
        PaperRow("iDT+FV [12]", None, _both(85.9, 57.2)),
        PaperRow("TDD [25]", None, _both(90.3, 63.2)),
        PaperRow("TDD+iDT [25]", None, _both(91.5, 65.9)),
        PaperRow("Early fusion joint LSTM (our model)", "early_fusion", _both(90.3, 61.2)),
        PaperRow("Late fusion joint LSTM (our model)", "late_fusion", _both(90.6, 61.7)),
    )),
    2: PaperTable(2, "Comparison of whether adopting multi-branch strategy.",
                  "HMDB51, average of 3 splits", (
        PaperRow("pool4", "single_pool4", _hmdb(42.8)),
        PaperRow("conv5_3", "single_conv5_3", _hmdb(45.5)),
        PaperRow("Late fusion", "late_fusion", _hmdb(61.7)),
    )),
    3: PaperTable(3, "Comparison of whether adopting 3d-convnet.", "HMDB51 split 1", (
        PaperRow("straightly connect VGG16 to LSTM", "vgg_lstm", _hmdb(57.3), (1,)),
        PaperRow("2d-convnet with regularization", "conv2d_reg", _hmdb(57.5), (1,)),
        PaperRow("simple 3d-convnet", "conv3d_plain", _hmdb(59.4), (1,)),
        PaperRow("3d-convnet with regularization", "late_fusion", _hmdb(61.9), (1,)),
    )),
    4: PaperTable(4, "Comparison of different structures.", "each split and their average", (
        PaperRow("split1, early fusion", "early_fusion", _both(90.2, 60.9), (1,)),
        PaperRow("split1, late fusion", "late_fusion", _both(90.7, 61.9), (1,)),
        PaperRow("split2, early fusion", "early_fusion", _both(90.8, 61.4), (2,)),
        PaperRow("split2, late fusion", "late_fusion", _both(90.8, 61.6), (2,)),
        PaperRow("split3, early fusion", "early_fusion", _both(89.9, 61.2), (3,)),
        PaperRow("split3, late fusion", "late_fusion", _both(90.3, 61.6), (3,)),
        PaperRow("average, early fusion", "early_fusion", _both(90.3, 61.2)),
        PaperRow("average, late fusion", "late_fusion", _both(90.6, 61.7)),
    )),
}


@dataclass(frozen=True, order=True)
class RunKey:
    """One training run behind the tables: a variant on one split of one dataset."""

    dataset: str
    split: int
    variant: str

    @property
    def name(self) -> str:
        """Its run name (`JlstmConfig.resolved_run_name`'s default), also its Tune key."""
        return f"{self.dataset}-split{self.split}-{self.variant}"


def table_runs(
    table: PaperTable,
    datasets: tuple[str, ...] | None = None,
    splits: tuple[int, ...] | None = None,
    variants: tuple[str, ...] | None = None,
) -> list[RunKey]:
    """The runs behind `table`'s rows, restricted to `datasets`, `splits`, `variants`
    (None: all the table has), sorted; a run several rows share is listed once."""
    keys = set()
    for row in table.rows:
        if row.variant is None or (variants is not None and row.variant not in variants):
            continue
        for dataset, figure in row.figures.items():
            if figure is None or (datasets is not None and dataset not in datasets):
                continue
            for split in row.splits:
                if splits is None or split in splits:
                    keys.add(RunKey(dataset, split, row.variant))
    return sorted(keys)
