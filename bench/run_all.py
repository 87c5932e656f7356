"""Run the benchmark suite; print a one-screen table and save every figure as JSON.

    python bench/run_all.py --data-root DATASETS        # or RETRAINER_DATA=DATASETS make bench

Each benchmark runs in its own process (so import time and peak memory are its own) and prints
JSON; this script gathers them into ``bench/results/bench-<time>.json`` and prints the table
with each figure's target.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common import BENCH, data_root, parser, run, work_dir

ORDER = ["b7_startup", "b1_extraction", "b2_end_to_end", "b3_bf16", "b5_memory", "b4_warm",
         "b6_label", "b8_runtimes"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", default="", help="Comma-separated benchmarks, e.g. b1,b7.")
    p.add_argument("--reuse-baseline", action="store_true",
                   help="Benchmark 2: reuse the saved retrain.py-style baseline result.")
    p.add_argument("--from-json", default=None, help="Only print the table of a saved result.")
    args = p.parse_args()
    if args.from_json:
        print_table(json.loads(Path(args.from_json).read_text()))
        return
    root = str(data_root(args))
    work = str(work_dir(args))
    wanted = [b for b in ORDER if not args.only or b.split("_")[0] in args.only.split(",")]
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "command": " ".join(sys.argv)}
    for name in wanted:
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--data-root", root, "--work-dir", work,
               "--backbones", args.backbones]
        if name == "b2_end_to_end" and args.reuse_baseline:
            cmd.append("--reuse-baseline")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        wall, text, _ = run(cmd)
        results[name] = dict(json.loads(text), wall_s=round(wall, 1))
    out = BENCH / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print_table(results)
    print(f"saved {out}", file=sys.stderr)


def _one_session_row(name: str, x: dict, key: str) -> list[tuple[str, str, str, str]]:
    """The same throughput over the raw pass of a single session (the runner before it split
    batches over two), for reference."""
    one = (x.get("raw_by_sessions") or {}).get("1") or (x.get("raw_by_sessions") or {}).get(1)
    if not one:
        return []
    return [(name, f"{x[key]} / {one} img/s = {x[key] / one:.3f}", "(info)", "")]


def _cpu_row(name: str, x: dict, key: str) -> list[tuple[str, str, str, str]]:
    """CPU-ms per image and cores kept busy, of the best round on each side: where time went."""
    ours, raw = x.get(f"{key}_best"), x.get("raw_best")
    if not ours or not raw:
        return []
    return [(name, f"{ours['cpu_ms_per_img']} / {raw['cpu_ms_per_img']} CPU-ms per image, "
                   f"busy {ours['cores_busy']:.0%} / {raw['cores_busy']:.0%}", "(info)", "")]


def print_table(r: dict) -> None:
    rows: list[tuple[str, str, str, str]] = []

    def ok(good: bool) -> str:
        return "yes" if good else "NO"

    if "b1_extraction" in r:
        for bb, x in r["b1_extraction"]["results"].items():
            rows.append((f"1 extraction/raw {bb}", f"{x['train_img_s']} / {x['raw_img_s']} img/s "
                         f"= {x['ratio']}", ">= 0.90", ok(x["ratio"] >= 0.9)))
            rows += _one_session_row(f"  vs one session {bb}", x, "train_img_s")
            rows += _cpu_row(f"  train / raw {bb}", x, "train")
    if "b2_end_to_end" in r:
        for bb, x in r["b2_end_to_end"]["results"].items():
            goal = 8 if bb == "inception_v3" else 20
            acc_ok = (x["retrainer_test_accuracy"] or 0) >= (x["baseline_test_accuracy"] or 0)
            rows.append((f"2 end-to-end {bb}", f"{x['baseline_s']} s / {x['retrainer_s']} s = "
                         f"{x['speedup']}x", f">= {goal}x", ok(x["speedup"] >= goal)))
            if "prepare_s" in x:
                rows.append((f"  + first freeze {bb}", f"{x['baseline_s']} s / ({x['retrainer_s']}"
                             f" + {x['prepare_s']}) s = {x['speedup_with_prepare']}x", "(info)", ""))
            rows.append((f"  test accuracy {bb}", f"ours {x['retrainer_test_accuracy']:.3f} vs "
                         f"baseline {x['baseline_test_accuracy']:.3f} (N={x['test_images']})",
                         ">= baseline", ok(acc_ok)))
    if "b3_bf16" in r:
        for bb, sets in r["b3_bf16"]["results"].items():
            for ds, x in sets.items():
                fast = x["speedup"] >= 1.6 if bb == "inception_v3" else True
                goal = bb == "inception_v3"
                rows.append((f"3 bf16 {bb} {ds[:11]}", f"{x['speedup']}x, acc {x['fp32_accuracy']:.3f}"
                             f"->{x['bf16_accuracy']:.3f} ({x['accuracy_delta_points']:+.1f} pt)",
                             ">=1.6x, 0.5pt" if goal else "(info)",
                             ok(fast and abs(x["accuracy_delta_points"]) <= 0.5) if goal else ""))
                if "mcnemar_p" in x:
                    rows.append(("  only one precision right", f"fp32 {x['fp32_only_right']}, bf16 "
                                 f"{x['bf16_only_right']} of {x['test_images']} (p={x['mcnemar_p']})",
                                 "(info)", ""))
    if "b4_warm" in r:
        x = r["b4_warm"]["results"]
        rows.append(("4 warm re-train 10k", f"{x['wall_s']} s", "<= 10 s", ok(x["wall_s"] <= 10)))
    if "b5_memory" in r:
        x = r["b5_memory"]["results"]
        big = x["10000"]["child_peak_rss_mb"]
        rows.append(("5 peak RSS 10k / 1k", f"{big:.0f} / {x['1000']['child_peak_rss_mb']:.0f} MB "
                     f"= {x['ratio']}", "<= 1.2, 1.5 GB", ok(x["ratio"] <= 1.2 and big <= 1536)))
    if "b6_label" in r:
        x = r["b6_label"]["results"]
        rows.append((f"6 label ({x.get('runtime', 'tensorflow')})/fastest raw lite0",
                     f"{x['label_img_s']} / {x['raw_img_s']} img/s = {x['ratio']}", ">= 0.85",
                     ok(x["ratio"] >= 0.85)))
        for runtime, y in (x.get("by_runtime") or {}).items():
            rows.append((f"  {runtime}", f"label {y['label_img_s']}, raw {y['raw_img_s']} img/s",
                         "(info)", ""))
        for runtime, y in (x.get("one_image") or {}).items():
            goal = runtime != "tensorflow"
            rows.append((f"  label 1 image, {runtime}", f"{y['wall_s']} s, {y['peak_rss_mb']:.0f} MB",
                         "<= 0.8 s, 300 MB" if goal else "(info)",
                         ok(y["wall_s"] <= 0.8 and y["peak_rss_mb"] <= 300) if goal else ""))
        if "by_runtime" not in x:  # results saved by the single-runtime version
            rows += _one_session_row("  vs one session lite0", x, "label_img_s")
            rows += _cpu_row("  label / raw lite0", x, "label")
    for name, x in (r.get("b8_runtimes", {}).get("results") or {}).items():
        if not isinstance(x, dict) or "fp32" not in x:
            continue
        for precision in ("fp32", "bf16"):
            rows.append((f"8 raw {precision} {name}",
                         ", ".join(f"{k} {v}" for k, v in x[precision].items()) + " img/s",
                         "(info)", ""))
        if "extraction_img_s" in x:
            rows.append((f"8 extraction default/previous {name}",
                         ", ".join(f"{k} {v}" for k, v in x["extraction_img_s"].items())
                         + f" img/s = {x['extraction_default_x_previous']}", ">= 1.8",
                         ok(x["extraction_default_x_previous"] >= 1.8)))
            rows.append((f"8 extraction/fastest raw fp32 {name}",
                         str(x["extraction_default_x_fastest_raw_fp32"]), ">= 0.90",
                         ok(x["extraction_default_x_fastest_raw_fp32"] >= 0.90)))
    if "b7_startup" in r:
        x = r["b7_startup"]["results"]
        rows.append(("7 retrainer --help", f"{x['help_s']} s (python -c pass {x['python_s']} s)",
                     "<= 0.3 s", ok(x["help_s"] <= 0.3)))
    widths = [max(len(row[i]) for row in rows + [("benchmark", "measured", "target", "met")])
              for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format("benchmark", "measured", "target", "met"))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


if __name__ == "__main__":
    main()
