"""ersm: Energy-Regularized Spatial Masking, sparse CNN inference on camera
streams, with the dense baseline of the same network beside it.

    import ersm

    net = ersm.Net()                                  # the bundled classifier
    with ersm.VideoSource("models/streams/vtest.mp4") as src, \\
         ersm.VideoOutput("http://127.0.0.1:8090") as out:
        for frame in src:                             # H×W×3 uint8, RGB
            r = net.process(frame, dense=True)
            print(r.label, r.keep_ratio, r.times["total"], r.dense.times["total"])
            out.render(frame, r)

See docs/python.md for every field.
"""

import os as _os

# The wheel carries the bundled models beside this file; the library looks
# for `models/...` there when they are not under the working directory.
_here = _os.path.dirname(_os.path.abspath(__file__))
if _os.path.isdir(_os.path.join(_here, "models")):
    _os.environ.setdefault("ERSM_DATA", _here)

from ._ersm import (  # noqa: E402
    Class,
    Dense,
    Error,
    Face,
    Net,
    Result,
    VideoOutput,
    VideoSource,
    __version__,
    cli,
)

__all__ = ["Net", "Result", "Dense", "Class", "Face", "VideoSource", "VideoOutput", "Error", "cli", "__version__"]
