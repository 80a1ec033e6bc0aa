"""The ten-line camera loop: ERSM beside the dense baseline on a stream,
shown live in the browser (http://127.0.0.1:8090/, with /metrics).

    python examples/camera.py                              # the bundled clip
    python examples/camera.py v4l2:///dev/video0 models/centerface_ersm
"""

import sys

import ersm

source = sys.argv[1] if len(sys.argv) > 1 else "models/streams/vtest.mp4"
net = ersm.Net(sys.argv[2] if len(sys.argv) > 2 else None)   # None: the bundled classifier
with ersm.VideoSource(source) as src, ersm.VideoOutput("http://127.0.0.1:8090") as out:
    for frame in src:                                        # H×W×3 uint8, RGB
        r = net.process(frame, dense=True)
        out.render(frame, r)
        print(f"{r.label:24s} keep {r.keep_ratio:.2f}  ERSM {r.times['total']:6.1f} ms"
              f"  dense {r.dense.times['total']:6.1f} ms  agree {r.agrees}")
