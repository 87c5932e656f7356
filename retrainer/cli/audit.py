"""``retrainer audit``."""
from __future__ import annotations

from pathlib import Path

import click

from ..config import SourceConfig, TrainConfig
from .bottlenecks import check_engine, engine_options
from .common import (FloatRange, backbone_configs, backbone_options, config_group, echo_json,
                     json_option, note)

_S = SourceConfig()


@click.command()
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder with one sub-folder of images per class (or train/ val/ test/ folders).")
@click.option("--db", default=None, metavar="URL",
              help="Audit a SQL database instead (see 'retrainer db import').")
@click.option("--where", "db_where", default=None, metavar="FILTER",
              help="With --db: which images, e.g. \"label IN ('cat', 'dog')\".")
@backbone_options
@click.option("--validation-percentage", default=_S.validation_percentage, show_default=True,
              type=FloatRange(0, 100, max_open=True),
              help="As in train: the splits shown for duplicate groups.")
@click.option("--testing-percentage", default=_S.testing_percentage, show_default=True,
              type=FloatRange(0, 100, max_open=True))
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
              help="Cross-validation folds for the out-of-fold probabilities.")
@click.option("--near-threshold", default=None, type=FloatRange(0, 1),
              help="Cosine similarity above which two images are near-duplicates "
                   "(default: the measured one, see docs/audit.md).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write an offline HTML page with thumbnails of every finding here.")
@click.option("--write-relabel", "relabel_csv", type=click.Path(dir_okay=False), default=None,
              help="Write path,label,suggested_label of the likely mislabels to this CSV.")
@click.option("--write-findings", "findings_name", default=None, metavar="NAME",
              help="With --db: write the findings to the audit_findings table under this name "
                   "(running it again replaces that name's rows; see docs/audit.md).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0),
              help="Text mode: rows shown per table.")
@engine_options
@json_option
def audit(as_json: bool, folds: int, near_threshold: float | None,
          report_dir: str | None, relabel_csv: str | None, findings_name: str | None,
          limit: int, **options: object) -> None:
    """Find duplicates, split leakage and likely mislabelled images (changes no file).

    \b
      retrainer audit --image-dir photos/ --backbone efficientnet_lite0
      retrainer audit --image-dir photos/ --backbone efficientnet_lite0 --json \\
          --report audit/ --write-relabel fix.csv
      retrainer audit --db images.sqlite --backbone efficientnet_lite0 --write-findings weekly
    """
    from ..audit import audit as run_audit
    from ..split import NEAR_DUPLICATE_SIMILARITY

    if bool(options.get("image_dir")) == bool(options.get("db")):
        raise click.UsageError("give either --image-dir DIR or --db URL.")
    if findings_name is not None and not options.get("db"):
        raise click.UsageError("--write-findings writes to a database: use it with --db URL.")
    if findings_name is not None and not 0 < len(findings_name) <= 64:
        raise click.BadParameter("give a name of 1 to 64 characters.",
                                 param_hint="'--write-findings'")
    check_engine(str(options["engine"]), options.get("spark_master"))  # type: ignore[arg-type]
    from ..export import check_output_dir

    if relabel_csv:  # at once, not after the extraction
        check_output_dir(Path(relabel_csv).parent, "--write-relabel")
    if report_dir:
        check_output_dir(report_dir, "--report")
    source = config_group(SourceConfig, options)
    backbone, extraction = backbone_configs(options)
    assert not options, f"options in no config group: {sorted(options)}"
    config = TrainConfig(source=source, backbone=backbone, extraction=extraction)
    result = run_audit(config, folds=folds,
                       near_threshold=NEAR_DUPLICATE_SIMILARITY if near_threshold is None
                       else near_threshold)
    if relabel_csv:
        n = result.write_relabel(relabel_csv)
        note(f"Wrote {n} suggested relabel(s) to {relabel_csv}")
    if report_dir:
        note(f"Wrote the report to {result.write_report(report_dir)}")
    if findings_name is not None:
        from ..db.audit_table import write_findings

        n = write_findings(source.db, result, findings_name)
        note(f"Wrote {n} finding(s) to the audit_findings table as '{findings_name}'")
    if as_json:
        echo_json(result.to_dict())
        return
    _print_text(result, limit, source.image_dir)


def _print_text(result, limit: int, root: str | None = None) -> None:  # noqa: ANN001
    """Tables for a person: paths relative to the image folder, columns as wide as their text."""
    echo = click.echo
    s = result.summary
    prefix = (root.rstrip("/\\") + "/") if root else ""

    def rel(path: str) -> str:
        return path[len(prefix):] if prefix and path.startswith(prefix) else path

    def width(values: list[str], title: str, cap: int = 24) -> int:
        return min(cap, max([len(title)] + [len(v) for v in values]))

    def more(rows: list) -> None:
        if len(rows) > limit:
            echo(f"  ... {len(rows) - limit} more (--limit, --json or --report for all)")

    where = f"; paths relative to {prefix}" if prefix else ""
    echo(f"Audit of {s['images']} images in {s['classes']} classes with {s['backbone']}{where}")
    issues = result.label_issues[:limit]
    echo(f"\nLikely mislabelled ({len(result.label_issues)}), most suspicious first:")
    if issues:
        wl = width([d["label"] for d in issues], "label")
        ws = width([d["suggested_label"] for d in issues], "suggested")
        echo(f"  {'score':>5}  {'label':<{wl}}  {'suggested':<{ws}}  path")
        for d in issues:
            echo(f"  {d['score']:5.3f}  {d['label']:<{wl}}  {d['suggested_label']:<{ws}}  "
                 f"{rel(d['path'])}")
    more(result.label_issues)
    groups = result.duplicates[:limit]
    echo(f"\nDuplicate groups ({len(result.duplicates)}; exact: identical bytes, near: the "
         "lowest bottleneck cosine of the links joining the group):")
    wl = width([label for d in groups for label in d["labels"]], "label")
    for d in groups:
        flags = [w for w, on in (("LABELS DIFFER", d["straddles_labels"]),
                                 ("SPLITS DIFFER", d["straddles_splits"])) if on]
        echo(f"  {d['kind']} {d['similarity']:.3f}, {len(d['paths'])} images"
             + (f"  [{', '.join(flags)}]" if flags else ""))
        for p, label, split in zip(d["paths"], d["labels"], d["splits"]):
            echo(f"    {label:<{wl}}  {split or '-':<10}  {rel(p)}")
    more(result.duplicates)
    outliers = result.outliers[:limit]
    echo(f"\nOutliers ({len(result.outliers)}), farthest from every class first:")
    wl = width([d["label"] for d in outliers], "label")
    for d in outliers:
        echo(f"  {d['score']:5.3f}  {d['label']:<{wl}}  {rel(d['path'])}")
    more(result.outliers)
    wc = width(list(s["per_class"]), "class", cap=40)
    echo(f"\n{'class':<{wc}}  {'images':>7}  {'mislabelled':>11}  {'share':>6}  "
         f"{'in dups':>7}  {'outliers':>8}")
    for name, c in s["per_class"].items():
        echo(f"{name:<{wc}}  {c['images']:>7}  {c['label_issues']:>11}  "
             f"{100 * c['suspected_share']:>5.1f}%  {c['in_duplicate_groups']:>7}  "
             f"{c['outliers']:>8}")
    echo(f"\n{s['images']} images: {s['label_issues']} likely mislabelled, "
         f"{s['exact_duplicate_groups']} exact and {s['near_duplicate_groups']} near duplicate "
         f"group(s) ({s['groups_straddling_labels']} across labels, "
         f"{s['groups_straddling_splits']} across splits), {s['outliers']} outlier(s)")
