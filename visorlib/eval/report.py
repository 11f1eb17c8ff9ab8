"""The evaluation report: accuracy next to cost, per dataset, category and configuration.

Built from the predictions records alone (so a resumed run and an uninterrupted one give the same
report). Each row holds the mean score (in %), the mean analytic language-model FLOPs per sample
(prefill + decode of the answer actually generated), the mean KV-cache bytes, the mean measured
seconds per sample and, for the router, how often it chose each configuration. Rendered as an
aligned text table, a JSON file and an accuracy-vs-FLOPs plot (one point per configuration and
the router, as in the VISOR paper's Fig. 1).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils import human

ALL = "all"
#: The ``Software`` tag of the plots written here (an existing plot without it is never overwritten).
PLOT_SOFTWARE = "visorlib eval"


@dataclass
class ReportRow:
    """One (dataset, category, configuration) cell group."""

    dataset: str
    category: str
    configuration: str
    samples: int
    score: float  # mean metric, in %
    metric: str
    flops: float  # mean language-model FLOPs per sample (prefill + decode)
    prefill_flops: float
    kv_bytes: float
    seconds: float
    generated_tokens: float
    choices: dict[str, int] = field(default_factory=dict)  # router only: chosen configuration -> samples


@dataclass
class EvalReport:
    """Rows of the table plus what the run skipped.

    Attributes:
        model: Model name.
        configurations: Column labels, in the order requested.
        rows: One :class:`ReportRow` per dataset x category (``"all"`` first) x configuration.
        skipped: Broken rows: ``{"dataset", "file", "index", "error"}``.
        predictions: What the predictions file gave: ``{"file", "reused", "total"}`` (not saved in
            the report's JSON, so a resumed run's report equals an uninterrupted one's).
    """

    model: str
    configurations: list[str]
    rows: list[ReportRow]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], model: str, configurations: list[str],
                     skipped: list[dict[str, Any]] | None = None) -> EvalReport:
        """Aggregate predictions records (any order) into rows."""
        groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
        for record in sorted(records, key=lambda r: (r["dataset"], r["index"], r["configuration"])):
            for category in (ALL, record.get("category")):
                if category is not None:
                    groups[(record["dataset"], str(category), record["configuration"])].append(record)
        order = {label: i for i, label in enumerate(configurations)}
        rows = []
        for (dataset, category, config), items in sorted(
                groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != ALL, kv[0][1], order.get(kv[0][2], 1 << 30))):
            n = len(items)

            def mean(key: str, items=items, n=n) -> float:
                return sum(r[key] for r in items) / n

            metrics = sorted({r["metric"] for r in items})
            choices = dict(sorted(Counter(",".join(map(str, r["sa_layers"])) or "none" for r in items).items())) \
                if config == "router" else {}
            rows.append(ReportRow(dataset, category, config, n, 100 * mean("score"), "+".join(metrics), mean("flops"),
                                  mean("prefill_flops"), mean("kv_bytes"), mean("seconds"), mean("generated_tokens"),
                                  choices))
        return cls(model, configurations, rows, list(skipped or []))

    def row(self, dataset: str, configuration: str, category: str = ALL) -> ReportRow:
        """The row of one dataset / configuration (/ category)."""
        for row in self.rows:
            if (row.dataset, row.category, row.configuration) == (dataset, category, configuration):
                return row
        raise KeyError(f"no row for dataset={dataset!r} category={category!r} configuration={configuration!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "configurations": self.configurations,
                "rows": [asdict(r) for r in self.rows], "skipped": self.skipped}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def table(self) -> str:
        """Aligned text table: one block per dataset, a line per category x configuration.

        The name columns are as wide as their longest entry: a truncated label (``8CA-2SA +
        visionzip(...)`` vs ``8CA-2SA + vispruner(...)``) could make two rows look the same.
        """
        names = [(r.dataset, r.category, r.configuration) for r in self.rows]
        widths = [max([len(title)] + [len(row[i]) for row in names]) for i, title in
                  enumerate(("dataset", "category", "configuration"))]

        def named(*values: str) -> str:
            return " ".join(f"{v:{w}s}" for v, w in zip(values, widths, strict=True))

        head = (f"{named('dataset', 'category', 'configuration')} {'n':>5s} {'score':>7s} "
                f"{'LLM FLOPs':>12s} {'KV (bf16)':>10s} {'s/sample':>9s}  router choices")
        lines = [head, "-" * len(head)]
        previous = None
        for r in self.rows:
            if previous is not None and r.dataset != previous:
                lines.append("")
            previous = r.dataset
            choices = " ".join(f"[{k}]x{v}" for k, v in r.choices.items())
            lines.append(f"{named(r.dataset, r.category, r.configuration)} {r.samples:5d} "
                         f"{r.score:6.2f}% {human(r.flops, 'FLOP'):>12s} {human(r.kv_bytes, 'B'):>10s} "
                         f"{r.seconds:9.4f}  {choices}".rstrip())
        for item in self.skipped:
            lines.append(f"skipped: {item['error']}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Accuracy vs mean FLOPs, one point per configuration (and the router), one panel per dataset.

        Needs matplotlib (``pip install 'visorlib[plot]'``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise RuntimeError("plotting needs matplotlib: pip install 'visorlib[plot]'") from err
        datasets = list(dict.fromkeys(r.dataset for r in self.rows))
        fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.0), squeeze=False)
        for ax, dataset in zip(axes[0], datasets, strict=True):
            rows = [r for r in self.rows if r.dataset == dataset and r.category == ALL]
            fixed = sorted((r for r in rows if r.configuration != "router"), key=lambda r: r.flops)
            ax.plot([r.flops / 1e9 for r in fixed], [r.score for r in fixed], "o-", color="tab:blue",
                    label="fixed configurations")
            for r in fixed:
                ax.annotate(r.configuration, (r.flops / 1e9, r.score), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            for r in rows:
                if r.configuration == "router":
                    ax.plot([r.flops / 1e9], [r.score], "*", color="tab:red", markersize=14, label="router")
            ax.set_xlabel("mean language-model GFLOPs per sample")
            ax.set_ylabel(f"{rows[0].metric} (%)" if rows else "score (%)")
            ax.set_title(dataset)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.model}: accuracy vs FLOPs")
        fig.tight_layout()
        path = Path(path)
        # Tagged so that a later run may overwrite this plot, and no other file (eval.cache.check_outputs).
        fig.savefig(path, dpi=120, metadata={"Software": PLOT_SOFTWARE} if path.suffix.lower() == ".png" else None)
        plt.close(fig)
        return path
