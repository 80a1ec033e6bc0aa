"""The Python package answers as the command line does on the same frames:
the same kept tokens, the same logits (or faces), ERSM's and dense's."""

import numpy as np
import pytest

from conftest import IMAGES, MODELS, STREAM, cli, lines


def test_images_match_bench_dump(ersm, classifier, tmp_path):
    dump = tmp_path / "bench.jsonl"
    n = len(list(IMAGES.glob("*.png"))) + len(list(IMAGES.glob("*.jpg")))
    cli("bench", "--model", MODELS / "mobilenet_v2_ersm", "--images", IMAGES, "--frames", n,
        "--warmup", 0, "--device", "cpu", "--dump", dump)
    expected = {r["image"]: r for r in lines(dump)}
    seen = 0
    with ersm.VideoSource(str(IMAGES)) as src:
        for frame in src:
            want = expected[src.frame_name]
            r = classifier.process(frame, dense=True)
            np.testing.assert_array_equal(r.kept, np.array(want["kept"], np.uint32))
            np.testing.assert_allclose(r.logits, want["logits"], rtol=0, atol=1e-4)
            np.testing.assert_allclose(r.dense.logits, want["dense_logits"], rtol=0, atol=1e-4)
            assert r.top1.index == int(np.argmax(want["logits"]))
            # The mask is the kept set on the cut's grid.
            assert r.mask.sum() == len(want["kept"])
            assert np.flatnonzero(r.mask.ravel()).tolist() == want["kept"]
            assert r.keep_ratio == pytest.approx(len(want["kept"]) / r.mask.size)
            seen += 1
    assert seen == n == len(expected)


def test_stream_loop_matches_run_dump(ersm, classifier, tmp_path):
    frames = 8
    dump = tmp_path / "run.jsonl"
    cli("run", "--source", STREAM, "--model", MODELS / "mobilenet_v2_ersm", "--max-frames", frames,
        "--warmup", 0, "--device", "cpu", "--dump", dump)
    expected = lines(dump)
    assert len(expected) == frames
    with ersm.VideoSource(str(STREAM)) as src:
        for want, frame in zip(expected, src):
            assert src.frame_name == want["image"]
            assert frame.shape == (576, 768, 3) and frame.dtype == np.uint8
            r = classifier.process(frame, dense=True)
            np.testing.assert_array_equal(r.kept, np.array(want["kept"], np.uint32))
            np.testing.assert_allclose(r.logits, want["logits"], rtol=0, atol=1e-4)
            np.testing.assert_allclose(r.dense.logits, want["dense_logits"], rtol=0, atol=1e-4)
            assert r.agrees == (r.top1.index == r.dense.top1.index)


def test_bgr_frames_are_read_as_rgb(classifier):
    frame = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    rgb = classifier.process(frame)
    bgr = classifier.process(np.ascontiguousarray(frame[:, :, ::-1]), bgr=True)
    np.testing.assert_array_equal(rgb.kept, bgr.kept)
    np.testing.assert_array_equal(rgb.logits, bgr.logits)


def test_detector_faces_match_bench_dump(ersm, tmp_path):
    photo = IMAGES / "astronaut.png"
    dump = tmp_path / "faces.jsonl"
    model = MODELS / "centerface_ersm"
    cli("bench", "--model", model, "--images", photo, "--frames", 1, "--warmup", 0,
        "--device", "cpu", "--dump", dump)
    (want,) = lines(dump)
    net = ersm.Net(model, device="cpu")
    assert net.kind == "detector" and net.input_size == (640, 480)
    with ersm.VideoSource(str(photo)) as src:
        frame = next(iter(src))
    r = net.process(frame, dense=True)
    assert r.kind == "detector" and r.top1 is None and r.top5 == []
    np.testing.assert_array_equal(r.kept, np.array(want["kept"], np.uint32))
    assert len(r.faces) == len(want["faces"]) >= 1
    for face, w in zip(r.faces, want["faces"]):
        np.testing.assert_allclose(face.box, w["bbox"], atol=1e-3)
        assert face.score == pytest.approx(w["score"], abs=1e-5)
        assert len(face.landmarks) == 5
    assert len(r.dense.faces) == len(want["dense_faces"])
    agreement = r.dense.face_agreement
    assert agreement["dense_faces"] == len(r.dense.faces)
    assert 0.0 <= agreement["recall"] <= 1.0
    assert r.label == ("1 face" if len(r.faces) == 1 else f"{len(r.faces)} faces")


def test_a_tracked_stream_matches_run_track(ersm, tmp_path):
    # The astronaut four times: from the second frame on, the tracked stream
    # holds the face found before and its gate runs at the stream's offset.
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        (frames / f"f{i}.png").write_bytes((IMAGES / "astronaut.png").read_bytes())
    dump = tmp_path / "track.jsonl"
    model = MODELS / "centerface_ersm"
    cli("run", "--source", frames, "--model", model, "--track", "--warmup", 0, "--device", "cpu",
        "--compare", "none", "--dump", dump)
    expected = lines(dump)
    assert len(expected) == 4
    net = ersm.Net(model, device="cpu", track=True)
    plain = ersm.Net(model, device="cpu")
    assert net.tracking and not plain.tracking
    moved = 0
    for _ in range(2):
        with ersm.VideoSource(str(frames)) as src:
            for want, frame in zip(expected, src):
                r = net.process(frame)
                np.testing.assert_array_equal(r.kept, np.array(want["kept"], np.uint32))
                assert len(r.faces) == len(want["faces"]) == 1
                np.testing.assert_allclose(r.faces[0].box, want["faces"][0]["bbox"], atol=1e-3)
                alone = plain.process(frame).faces[0].box
                moved += int(np.abs(np.asarray(r.faces[0].box) - np.asarray(alone)).max() > 1e-3)
        # A new stream starts over: the same answers again.
        net.new_stream()
    assert moved >= 2, "the stream's held faces and gate offset changed no answer"
