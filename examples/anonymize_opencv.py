"""Faces blurred with OpenCV frames in and out: ersm reads OpenCV's BGR
arrays in place (`bgr=True`) and hands back boxes and landmarks in frame
pixels, to draw or cover however you like.

    pip install opencv-python-headless
    python examples/anonymize_opencv.py INPUT.mp4 OUTPUT.mp4
"""

import sys

import cv2

import ersm

net = ersm.Net("models/centerface_ersm")
cap = cv2.VideoCapture(sys.argv[1])
fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
writer = None
while True:
    ok, frame = cap.read()                                   # BGR, H×W×3 uint8
    if not ok:
        break
    r = net.process(frame, bgr=True)
    for face in r.faces:
        x1, y1, x2, y2 = (int(v) for v in face.box)
        roi = frame[max(0, y1):y2, max(0, x1):x2]
        if roi.size:
            frame[max(0, y1):y2, max(0, x1):x2] = cv2.blur(roi, (31, 31))
    if writer is None:
        h, w = frame.shape[:2]
        writer = cv2.VideoWriter(sys.argv[2], cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    writer.write(frame)
    print(f"{len(r.faces)} face(s), keep {r.keep_ratio:.2f}, {r.times['total']:.1f} ms")
cap.release()
if writer is not None:
    writer.release()
