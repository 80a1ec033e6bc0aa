"""Shared fixtures: the repository's bundled models and media, and the
command line as `python -m ersm` runs it (the same code as the binary)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
STREAM = MODELS / "streams" / "vtest.mp4"
IMAGES = MODELS / "images"


def cli(*args, check=True):
    """`python -m ersm ARGS`: its completed process (stdout and stderr as text)."""
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    p = subprocess.run([sys.executable, "-m", "ersm", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"python -m ersm {' '.join(map(str, args))}: exit {p.returncode}\n{p.stderr}")
    return p


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def ersm():
    import ersm as module

    return module


@pytest.fixture(scope="session")
def classifier(ersm):
    """The bundled classifier on the CPU, on every core the CLI would use."""
    return ersm.Net(MODELS / "mobilenet_v2_ersm", device="cpu")
