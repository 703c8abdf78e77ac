"""`ddt-export generate --num N` to completion, local or `--ray --workers W`: wall time, peak RSS, RSS over the run.

    python benchmarks/generate_scale/generate_scale.py --num 5000 --out /tmp/gen5000 \
        --json benchmarks/generate_scale/generate_scale-local.json
    python benchmarks/generate_scale/generate_scale.py --num 5000 --ray --workers 2 --out /tmp/gen5000-ray \
        --json benchmarks/generate_scale/generate_scale-ray.json
    python benchmarks/generate_scale/generate_scale.py --report benchmarks/generate_scale/generate_scale-*.json

Runs the CLI in a subprocess (bundled model, default sampler: 50 steps, CFG 1.5, schedule `all`; --format
png,npz) and samples the RSS of its whole process tree (driver, and for --ray the Ray processes and actors) every
0.5 s from /proc. Reports the driver's peak (VmHWM, its own image), the tree's peak (a sum of RSS: pages shared
between processes count more than once) and both at every tenth of the run, so flatness shows. Then the FID of
the PNG folder and of samples.npz against the bundled digits statistics (they must be equal).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]  # run as a script: this checkout's ddt_export and cli

WRAPPER = """
import sys, cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
print("VmHWM", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")), flush=True)
sys.exit(code)
"""


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """(RSS of pid, summed RSS of pid and every descendant), KiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    total, own, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            rss = next(int(line.split()[1]) for line in open(f"/proc/{p}/status") if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            rss = 0
        own = rss if p == pid else own
        total += rss
        todo += children.get(p, [])
    return own, total


def report(paths: list[Path]) -> str:
    """Markdown of finished runs' JSON (the README's tables): one row per run, then each run's RSS at every
    tenth (flatness)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = ["| run | wall | images/s | driver peak RSS | tree peak RSS | FID PNG folder | FID samples.npz |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        out.append(f"| `{r['command']}` | {r['wall_s']:.0f} s | {r['num'] / r['wall_s']:.2f} | "
                   f"{r['driver_peak_rss_mib']:.0f} MiB | {r['tree_peak_rss_mib']:.0f} MiB | "
                   f"{r['fid_png_vs_digits']:.6f} | {r['fid_npz_vs_digits']:.6f} |")
    for r in runs:
        out += ["", f"RSS over the run, `{r['command']}` (samples written, s, driver MiB, tree MiB): " + "; ".join(
            f"{t['done']} {t['s']:.0f} s {t['driver_rss_mib']:.0f} / {t['tree_rss_mib']:.0f}"
            for t in r["rss_at_tenths"])]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, nargs="+", help="print the tables of finished runs' --json files")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None, help="a quick check only (the measurement: the manifest's)")
    a = ap.parse_args(argv)
    if a.report:
        print(report(a.report))
        return
    if a.out is None:
        ap.error("--out is required")
    argv = ["generate", "--num", str(a.num), "--out", str(a.out), "--format", "png,npz"]
    argv += ["--steps", str(a.steps)] if a.steps else []
    if a.ray:
        argv += ["--ray"] + (["--workers", str(a.workers)] if a.workers else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    timeline = []  # (seconds, samples written, driver RSS, tree RSS)
    while p.poll() is None:
        own, total = tree_rss_kib(p.pid)
        done = sum(1 for _ in a.out.glob("*-class*.png")) if a.out.is_dir() else 0
        timeline.append((round(time.time() - t0, 1), done, own, total))
        time.sleep(0.5)
    stdout, stderr = p.communicate()
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"generate failed ({p.returncode}):\n{stderr[-3000:]}")
    lines = stdout.strip().splitlines()
    hwm = int(lines[-1].split()[1])
    tenths = []
    for k in range(1, 11):
        hit = next((t for t in timeline if t[1] >= k * a.num // 10), timeline[-1])
        tenths.append({"done": hit[1], "s": hit[0], "driver_rss_mib": hit[2] / 1024, "tree_rss_mib": hit[3] / 1024})
    from ddt_export.evaluate.features import DIGITS_STATS
    from ddt_export.evaluate.fid import fid_from_paths

    fid_png = fid_from_paths(a.out, DIGITS_STATS).value
    fid_npz = fid_from_paths(a.out / "samples.npz", DIGITS_STATS).value
    res = {"command": "ddt-export " + " ".join(argv), "num": a.num, "wall_s": wall, "summary": lines[:-1],
           "driver_peak_rss_mib": hwm / 1024, "tree_peak_rss_mib": max(t[3] for t in timeline) / 1024,
           "rss_at_tenths": tenths, "fid_png_vs_digits": fid_png, "fid_npz_vs_digits": fid_npz,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(),
           "loadavg_end": os.getloadavg()}
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
