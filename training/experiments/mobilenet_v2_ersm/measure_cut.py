"""The stride-4 cut against the shipped stride-8 one: train.py's held-out curves
of both, and `ersm bench` of the packages one after another in one run.

    ERSM_CUT=4 python3 train.py --opencv ... --tuxpaint ... --out /tmp/cut4 --threads 1 \\
        --points 0.02:0.4,0.02:0.5,0.02:0.6,0.02:0.75          # exports the 0.6 point
    ERSM_CUT=4 python3 train.py ... --out /tmp/cut4b --points 0.02:0.5    # exports the 0.5 point
    python3 measure_cut.py --stride4 /tmp/cut4 /tmp/cut4b --threads 1 --finding "..."

Writes runs/cut4.json, which report_finetune.py renders in REPORT.md.
"""

import argparse
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def bench(binary, package, threads, frames):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([binary, "bench", "--model", package, "--threads", str(threads),
                        "--frames", str(frames), "--json", f.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        b = json.load(open(f.name))
    p50 = lambda mode, stage: b["stages"][mode][stage]["p50_ms"]
    return {"keep": b["keep_ratio"], "prefix": p50("ersm", "prefix"), "ersm": p50("ersm", "ersm"),
            "suffix": p50("ersm", "suffix"), "total": p50("ersm", "total"),
            "dense_total": p50("dense", "total"), "dense_suffix": p50("dense", "suffix"),
            "mac_fraction": b["suffix_macs_ersm"] / b["suffix_macs_dense"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stride4", nargs="+", required=True, help="stride-4 packages from train.py")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/ersm"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--finding", default="")
    a = ap.parse_args()
    shipped = json.load(open(os.path.join(HERE, "training.json")))
    curve4 = {}
    for pkg in a.stride4:
        t = json.load(open(os.path.join(pkg, "training.json")))
        assert t["settings"]["cut"] == 4, pkg
        for q in t["curve"]:
            curve4[q["ratio"]] = q
    rows = []
    for name, pkg in [("stride 8 (shipped)", HERE)] + [
            (f"stride 4, ratio {json.load(open(os.path.join(p, 'training.json')))['chosen']['ratio']:g}", p)
            for p in a.stride4]:
        rows.append({"package": name, **bench(a.binary, pkg, a.threads, a.frames)})
    held = shipped["held_out_per_image"]
    out = {"photos": len(held), "views": sum(v["views"] for v in held.values()),
           "stride8_curve": [q for q in shipped["curve"] if q["beta"] == 0.02],
           "stride4_curve": [curve4[r] for r in sorted(curve4)],
           "bench": {"threads": a.threads, "frames": a.frames, "rows": rows},
           "finding": a.finding}
    with open(os.path.join(HERE, "runs", "cut4.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
