"""Rendering from Python: overlays into a folder, faces covered, and the
live server's viewer and /metrics fed from a Python loop."""

import urllib.request

import numpy as np

from conftest import IMAGES, MODELS, STREAM


def test_overlays_into_a_folder(ersm, classifier, tmp_path):
    out_dir = tmp_path / "overlay"
    with ersm.VideoSource(str(STREAM)) as src, ersm.VideoOutput(str(out_dir)) as out:
        for i, frame in enumerate(src):
            out.render(frame, classifier.process(frame))
            if i == 2:
                break
        assert out.frames == 3
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == 3
    with ersm.VideoSource(str(pngs[0])) as back:
        img = back.capture()
    # The overlay draws on the frame (heat map, outlines, caption band).
    with ersm.VideoSource(str(STREAM)) as src:
        first = src.capture()
    assert img.shape[1] == first.shape[1] and not np.array_equal(img[: first.shape[0]], first)


def test_anonymize_covers_the_faces(ersm, tmp_path):
    net = ersm.Net(MODELS / "centerface_ersm", device="cpu")
    with ersm.VideoSource(str(IMAGES / "astronaut.png")) as src:
        frame = src.capture()
    r = net.process(frame)
    assert r.faces, "the astronaut's face is found"
    with ersm.VideoOutput(str(tmp_path / "anon"), anonymize="solid") as out:
        out.render(frame, r)
    (png,) = sorted((tmp_path / "anon").glob("*.png"))
    with ersm.VideoSource(str(png)) as back:
        img = back.capture()
    x1, y1, x2, y2 = (int(round(v)) for v in r.faces[0].box)
    inside = img[y1 + 2:y2 - 2, x1 + 2:x2 - 2]
    assert inside.size and inside.max() == 0, "a solid cover is black over the face"
    # Outside the covered faces the frame is untouched.
    assert np.array_equal(img[-10:, :], frame[-10:, :])


def test_live_view_and_metrics_from_python(ersm, classifier):
    with ersm.VideoOutput("http://127.0.0.1:0") as out:
        assert out.address.startswith("http://127.0.0.1:")
        with ersm.VideoSource(str(STREAM)) as src:
            for i, frame in enumerate(src):
                out.render(frame, classifier.process(frame, dense=True))
                if i == 3:
                    break
        metrics = urllib.request.urlopen(out.address + "metrics", timeout=10).read().decode()
        page = urllib.request.urlopen(out.address, timeout=10).read().decode()
    assert "ersm_frames_total 4" in metrics
    assert "ersm_keep_ratio" in metrics
    assert "<html" in page.lower()
