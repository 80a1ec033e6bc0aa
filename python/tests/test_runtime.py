"""The package as a runtime: memory stays flat over thousands of frames,
the GIL is released while a frame runs, and `python -m ersm` is the CLI."""

import sys
import threading
import time

import numpy as np

from conftest import MODELS, cli


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_memory_stays_flat_over_thousands_of_frames(ersm):
    net = ersm.Net(MODELS / "tiny", device="cpu", threads=1)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(8)]
    for i in range(300):  # allocator and caches settle
        net.process(frames[i % 8], dense=i % 2 == 0)
    start = rss_mib()
    for i in range(3000):
        r = net.process(frames[i % 8], dense=i % 2 == 0)
        # Every field a loop reads, so their copies are made (and freed).
        _ = (r.mask, r.kept, r.energies, r.logits, r.times, r.top5, r.dense)
    grown = rss_mib() - start
    assert grown < 16, f"RSS grew {grown:.1f} MiB over 3000 frames"


def test_the_gil_is_released_while_a_frame_runs(ersm, classifier):
    frame = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    classifier.process(frame)
    done = threading.Event()
    ticks = 0

    def work():
        for _ in range(5):
            classifier.process(frame, dense=True)
        done.set()

    t = threading.Thread(target=work)
    t0 = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0)
    t.join()
    elapsed = time.perf_counter() - t0
    # Holding the GIL, the loop would tick only between calls (about ten
    # times); released, it ticks throughout.
    assert ticks > 200, f"{ticks} ticks in {elapsed:.2f} s"


def test_python_m_ersm_is_the_command_line(ersm):
    p = cli("--version")
    assert p.stdout.strip() == f"ersm {ersm.__version__}"
    p = cli("inspect", "--model", MODELS / "tiny")
    assert "cut" in p.stdout and "energy node" in p.stdout
    bad = cli("bogus", check=False)
    assert bad.returncode == 2 and "unrecognized subcommand" in bad.stderr
    failed = cli("inspect", "--model", "/nonexistent/package", check=False)
    assert failed.returncode == 1 and failed.stderr.startswith("error: ")
    assert ersm.cli(["--version"]) == 0


def test_stubs_cover_the_module(ersm):
    import ast
    from pathlib import Path

    stub = Path(ersm.__file__).with_name("_ersm.pyi")
    tree = ast.parse(stub.read_text())
    declared = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    public = {n for n in dir(ersm._ersm) if not n.startswith("_")}
    assert public <= declared | {"Frame"}, public - declared
    for cls in ("Net", "Result", "Dense", "Class", "Face", "VideoSource", "VideoOutput"):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        stubbed = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
        real = {n for n in dir(getattr(ersm, cls)) if not n.startswith("_")}
        assert real <= stubbed, f"{cls}: {sorted(real - stubbed)} missing from the stub"
        assert getattr(ersm, cls).__doc__, f"{cls} has no docstring"
    assert sys.version_info >= (3, 9)
