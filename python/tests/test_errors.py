"""Bad input is a Python exception with a message that says what was wrong,
never a crash: arrays of the wrong kind, closed sources and outputs, bad
packages and URIs."""

import numpy as np
import pytest

from conftest import IMAGES, MODELS, STREAM


@pytest.mark.parametrize(
    "frame, kind, says",
    [
        (np.zeros((64, 64, 3), np.float32), TypeError, "dtype uint8"),
        (np.zeros((64, 64, 3), np.int8), TypeError, "dtype uint8"),
        ([[[0, 0, 0]]], TypeError, "numpy array"),
        (None, TypeError, "numpy array"),
        (np.zeros((64, 64), np.uint8), ValueError, "shape (H, W, 3)"),
        (np.zeros((64, 64, 4), np.uint8), ValueError, "shape (H, W, 3)"),
        (np.zeros((1, 64, 64, 3), np.uint8), ValueError, "shape (H, W, 3)"),
        (np.zeros((0, 64, 3), np.uint8), ValueError, "each side"),
        (np.zeros((64, 128, 3), np.uint8)[:, ::2], ValueError, "C-contiguous"),
        (np.zeros((3, 64, 64), np.uint8).transpose(1, 2, 0), ValueError, "C-contiguous"),
    ],
)
def test_bad_frames_raise(classifier, frame, kind, says):
    with pytest.raises(kind, match=None) as e:
        classifier.process(frame)
    assert says in str(e.value)


def test_net_still_works_after_bad_frames(classifier):
    for bad in (np.zeros((4, 4), np.uint8), "frame"):
        with pytest.raises((TypeError, ValueError)):
            classifier.process(bad)
    r = classifier.process(np.full((120, 160, 3), 128, np.uint8))
    assert 0.0 < r.keep_ratio <= 1.0


def test_bad_packages_and_options(ersm, tmp_path):
    with pytest.raises(ersm.Error, match="not found"):
        ersm.Net(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(ersm.Error, match="manifest"):
        ersm.Net(tmp_path)
    with pytest.raises(ValueError, match="device"):
        ersm.Net(MODELS / "tiny", device="tpu")
    with pytest.raises(ersm.Error, match="threads"):
        ersm.Net(MODELS / "tiny", device="cpu", threads=0)
    with pytest.raises(ersm.Error, match="classifier"):
        ersm.Net(MODELS / "mobilenet_v2_ersm", device="cpu", input_size=(320, 256))
    with pytest.raises(ValueError, match="input_size"):
        ersm.Net(MODELS / "centerface_ersm", device="cpu", input_size=(16, 4096))


def test_closed_and_bad_sources(ersm, tmp_path):
    src = ersm.VideoSource(str(STREAM))
    assert src.capture().shape == (576, 768, 3)
    src.close()
    with pytest.raises(ersm.Error, match="closed"):
        src.capture()
    with pytest.raises(ersm.Error, match="closed"):
        next(iter(src))
    src.close()  # twice is fine
    with pytest.raises(ersm.Error, match="missing.mp4"):
        ersm.VideoSource(str(tmp_path / "missing.mp4"))
    with pytest.raises(ersm.Error, match="scheme"):
        ersm.VideoSource("gopher://camera")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    # An image that does not decode is skipped (and logged), as the CLI does.
    with ersm.VideoSource(str(tmp_path)) as s:
        assert s.capture() is None


def test_sources_end_and_iterate(ersm):
    with ersm.VideoSource(str(IMAGES)) as src:
        frames = list(src)
        assert src.capture() is None
    assert len(frames) == 4 and all(f.ndim == 3 and f.flags.c_contiguous for f in frames)


def test_outputs_refuse_what_they_cannot_draw(ersm, classifier, tmp_path):
    with pytest.raises(ValueError, match="anonymize"):
        ersm.VideoOutput(str(tmp_path / "o"), anonymize="pixelate")
    with pytest.raises(ersm.Error, match="scheme"):
        ersm.VideoOutput("ftp://host/x")
    out = ersm.VideoOutput(str(tmp_path / "frames"))
    frame = np.zeros((96, 128, 3), np.uint8)
    r = classifier.process(frame)
    with pytest.raises(ValueError, match="result is of a 128×96 frame"):
        out.render(np.zeros((64, 64, 3), np.uint8), r)
    out.render(frame, r)
    out.close()
    with pytest.raises(ersm.Error, match="closed"):
        out.render(frame, r)
    with pytest.raises(TypeError):
        out.render(frame, "not a result")
