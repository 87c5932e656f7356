"""``retrainer audit``: duplicates, likely mislabels (Confident Learning), outliers, report."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrainer.audit import (calibrated_counts, confident_joint, find_label_issues, joint_estimate,
                             normalized_margin)
from retrainer.cli import cli

from conftest import TINY, make_colour_tree


def test_confident_joint_and_pruning_by_noise_rate_by_hand():
    # 3 classes; rows 0-3 labelled 0, 4-7 labelled 1, 8-11 labelled 2; row 3 looks like class 1
    probs = np.array([[.9, .05, .05]] * 3 + [[.05, .9, .05]] + [[.05, .9, .05]] * 4
                     + [[.05, .05, .9]] * 4)
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    c, t = confident_joint(labels, probs)
    assert t[0] == pytest.approx((0.9 * 3 + 0.05) / 4)
    assert c.tolist() == [[3, 1, 0], [0, 4, 0], [0, 0, 4]]
    q = joint_estimate(c, labels)
    assert q.sum() == pytest.approx(1) and q[0, 1] == pytest.approx(1 / 12)
    assert np.flatnonzero(find_label_issues(labels, probs)).tolist() == [3]
    assert normalized_margin(labels, probs)[3] == pytest.approx(0.05 - 0.9)


def test_calibrated_confident_joint_keeps_every_row_at_its_label_count():
    # row 1: 56 counted of 74 images labelled 1; scaled 2.64 59.46 6.61 2.64 2.64 (= 74).
    # Rounding each cell alone gives 3 59 7 3 3 = 75 images: one image too many to prune.
    c = np.array([[52, 6, 1, 4, 2], [2, 45, 5, 2, 2], [2, 3, 42, 0, 1],
                  [1, 2, 5, 40, 2], [3, 2, 3, 3, 42]])
    labels = np.repeat(np.arange(5), [75, 74, 71, 70, 70])
    counts = calibrated_counts(c, labels)
    assert counts.sum(axis=1).tolist() == [75, 74, 71, 70, 70]
    assert counts[1].tolist() == [3, 59, 6, 3, 3]
    assert counts[3].tolist() == [1, 3, 7, 56, 3]  # exact values stay as they are
    # a tie (16.5 / 1.5) goes to the larger cell: the image is not flagged on a coin toss
    assert calibrated_counts(np.array([[11, 1], [0, 4]]), np.repeat([0, 1], [18, 4]))[0].tolist() \
        == [17, 1]


def _dirty_tree(root: Path) -> Path:
    images = make_colour_tree(root / "images", per_class=12)
    # a red image filed under green, an exact copy across labels, a same-label copy
    shutil.move(images / "red" / "img005.png", images / "green" / "img_wrong.png")
    shutil.copy(images / "blue sky" / "img000.png", images / "red" / "looks_blue.png")
    shutil.copy(images / "green" / "img001.png", images / "green" / "img001 copy.png")
    return images


def test_audit_json_finds_the_damage(tmp_path):
    images = _dirty_tree(tmp_path)
    args = ["audit", "--image-dir", str(images), "--architecture", TINY,
            "--bottleneck-dir", str(tmp_path / "bn"), "--json", "--folds", "3",
            "--write-relabel", str(tmp_path / "fix.csv"), "--report", str(tmp_path / "report")]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert set(doc) == {"label_issues", "duplicates", "outliers", "summary"}
    issues = {Path(d["path"]).name: d for d in doc["label_issues"]}
    assert "img_wrong.png" in issues and issues["img_wrong.png"]["suggested_label"] == "red"
    assert issues["img_wrong.png"]["label"] == "green"
    assert set(doc["label_issues"][0]) == {"path", "label", "suggested_label", "score"}
    assert [d["score"] for d in doc["label_issues"]] == sorted(
        (d["score"] for d in doc["label_issues"]), reverse=True)
    exact = [d for d in doc["duplicates"] if d["kind"] == "exact"]
    groups = sorted(sorted(Path(p).name for p in d["paths"]) for d in exact)
    assert groups == [["img000.png", "looks_blue.png"], ["img001 copy.png", "img001.png"]]
    assert all(set(d) == {"kind", "paths", "labels", "splits", "similarity"} for d in exact)
    cross = [d for d in exact if "looks_blue.png" in str(d["paths"])][0]
    assert sorted(cross["labels"]) == ["blue sky", "red"] and len(set(cross["splits"])) == 1
    assert str(images) in cross["paths"][0]  # paths as given
    assert doc["summary"]["per_class"]["green"]["images"] == 14
    with open(tmp_path / "fix.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"path": str(images / "green" / "img_wrong.png"), "label": "green",
            "suggested_label": "red"} in rows
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 5 and "img_wrong.png" in page
    # nothing in the image folder changed
    assert (images / "green" / "img_wrong.png").exists()


def test_audit_text_mode_and_usage_errors(tmp_path):
    images = _dirty_tree(tmp_path)
    run = CliRunner().invoke(cli, ["audit", "--image-dir", str(images), "--backbone", TINY,
                                   "--bottleneck-dir", str(tmp_path / "bn"), "--folds", "3"])
    assert run.exit_code == 0, run.output
    assert "Likely mislabelled" in run.stdout and "LABELS DIFFER" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("38 images:")
    # paths relative to the image folder, named once at the top
    lines = run.stdout.splitlines()
    assert lines[0].endswith(f"paths relative to {images}/")
    assert sum(str(images) in line for line in lines) == 1
    assert any(line.endswith("  green/img_wrong.png") for line in lines)
    run = CliRunner().invoke(cli, ["audit"])
    assert run.exit_code == 2 and "--image-dir" in run.output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_html_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    images = _dirty_tree(tmp_path)
    run = CliRunner().invoke(cli, ["audit", "--image-dir", str(images), "--architecture", TINY,
                                   "--bottleneck-dir", str(tmp_path / "bn"), "--folds", "3",
                                   "--json", "--report", str(tmp_path / "report")])
    assert run.exit_code == 0, run.output
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1000,900", f"--screenshot={shot}",
                    (tmp_path / "report" / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[0] > 500 and pixels.std() > 20
    # the colour thumbnails are drawn: strongly red, green and blue pixels are all present
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r > 150) & (g < 90) & (b < 90)).sum() > 500
    assert ((g > 150) & (r < 90) & (b < 90)).sum() > 500
    assert ((b > 150) & (r < 90) & (g < 90)).sum() > 500
    keep = Path(__file__).parent.parent / ".pytest_cache" / "audit_report.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)


def test_audit_of_a_sqlite_database_writes_its_findings_table_idempotently(tmp_path):
    from sqlalchemy import text

    from retrainer.db.importer import import_folder
    from retrainer.db.url import connect

    db = str(tmp_path / "images.db")
    import_folder(db, _dirty_tree(tmp_path))  # identical files are one row in a database
    base = ["audit", "--db", db, "--backbone", TINY, "--bottleneck-dir", str(tmp_path / "bn"),
            "--folds", "3"]

    def rows(name: str) -> list[tuple]:
        with connect(db).connect() as conn:
            return [tuple(r) for r in conn.execute(text(
                "SELECT i.path, f.kind, f.label, f.suggested_label FROM audit_findings f "
                "JOIN images i ON i.id = f.image_id WHERE f.audit = :a ORDER BY f.id"),
                {"a": name})]

    run = CliRunner().invoke(cli, base + ["--json", "--write-findings", "first"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["summary"]["images"] == 36
    issue = [d for d in doc["label_issues"] if d["path"].endswith("green/img_wrong.png")]
    assert issue and issue[0]["path"].startswith("#")  # the database names images by id
    first = rows("first")
    assert ("green/img_wrong.png", "label_issue", "green", "red") in first
    assert len(first) == len(doc["label_issues"]) + len(doc["outliers"]) + sum(
        len(d["paths"]) for d in doc["duplicates"])
    # a re-run replaces that audit's rows; another name sits beside them
    assert CliRunner().invoke(cli, base + ["--write-findings", "first"]).exit_code == 0
    assert CliRunner().invoke(cli, base + ["--write-findings", "second"]).exit_code == 0
    assert rows("first") == first and rows("second") == first
    run = CliRunner().invoke(cli, ["audit", "--image-dir", str(tmp_path / "images"),
                                   "--write-findings", "x"])
    assert run.exit_code == 2 and "--db" in run.output
