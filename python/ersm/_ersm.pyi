"""Type stubs of ersm's extension module (`ersm._ersm`), re-exported by `ersm`."""

from os import PathLike
from types import TracebackType
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

Frame = npt.NDArray[np.uint8]
"""An `H × W × 3` uint8 image, RGB (or BGR with `bgr=True`), C-contiguous."""

class Error(Exception):
    """What ersm could not do (a bad model package, a frame it cannot
    read, a source or output that failed), with the command line's message."""

def cli(argv: Sequence[str]) -> int:
    """Runs the `ersm` command line with `argv` (without the program name);
    returns its exit status. `python -m ersm` calls it."""

class Class:
    """A class and its softmax probability."""

    @property
    def index(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def prob(self) -> float: ...

class Face:
    """A face found, in frame pixels."""

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2)."""
    @property
    def score(self) -> float:
        """The heatmap's score at the face's centre."""
    @property
    def landmarks(self) -> list[tuple[float, float]]:
        """Eyes, nose and mouth corners: five (x, y)."""

class Dense:
    """The dense baseline's answer on the same frame."""

    @property
    def logits(self) -> npt.NDArray[np.float32]: ...
    @property
    def times(self) -> dict[str, float]:
        """Milliseconds: preprocess, prefix, ersm (0), suffix, total, ersm_kernel (0)."""
    @property
    def top1(self) -> Optional[Class]: ...
    @property
    def top5(self) -> list[Class]: ...
    @property
    def faces(self) -> list[Face]: ...
    @property
    def label(self) -> str: ...
    @property
    def face_agreement(self) -> Optional[dict[str, Optional[float]]]:
        """A detector's ERSM faces matched to dense's at IoU ≥ 0.5:
        dense_faces, found, matched, recall, precision, f1, mean_iou."""

class Result:
    """What ERSM answered for one frame."""

    @property
    def kind(self) -> Literal["classifier", "detector"]: ...
    @property
    def label(self) -> str:
        """The top-1 label, or "N faces"."""
    @property
    def top1(self) -> Optional[Class]:
        """A classifier's most probable class (None for a detector)."""
    @property
    def top5(self) -> list[Class]:
        """A classifier's five most probable classes (empty for a detector)."""
    @property
    def faces(self) -> list[Face]:
        """A detector's faces (empty for a classifier)."""
    @property
    def keep_ratio(self) -> float:
        """Fraction of the cut's tokens kept."""
    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        """Kept tokens on the cut's grid (H × W tokens)."""
    @property
    def kept(self) -> npt.NDArray[np.uint32]:
        """Raster indices of the kept tokens, ascending."""
    @property
    def energies(self) -> npt.NDArray[np.float32]:
        """Each token's final energy (H × W); kept where negative."""
    @property
    def logits(self) -> npt.NDArray[np.float32]:
        """The network's outputs, flattened one after another."""
    @property
    def times(self) -> dict[str, float]:
        """Milliseconds: preprocess, prefix, ersm, suffix, total, ersm_kernel."""
    @property
    def suffix_compute(self) -> float:
        """Suffix multiply-adds spent, as a fraction of the dense suffix's."""
    @property
    def fell_back(self) -> bool:
        """Re-run densely because the sparse answer was unsure (fallback=True)."""
    @property
    def dense(self) -> Optional[Dense]:
        """The dense baseline, when `process(..., dense=True)`."""
    @property
    def agrees(self) -> Optional[bool]:
        """ERSM agrees with dense (None when dense did not run)."""
    @property
    def size(self) -> tuple[int, int]:
        """The frame's (width, height) in pixels."""

class Net:
    """A model package loaded and placed: ERSM with the dense baseline beside it.

    `model`: a package folder (default: the bundled classifier);
    `device`: "cpu", "cuda" or "auto"; `threads`: worker threads (default:
    every core); `input_size`: a detector's (width, height), multiples of 32;
    `fallback`: re-run unsure frames densely; `track`: a detector's frames
    are one stream, in the order `process` is called (its package's `track`
    settings)."""

    def __init__(
        self,
        model: Union[str, PathLike[str], None] = None,
        *,
        device: Literal["cpu", "cuda", "auto"] = "auto",
        threads: Optional[int] = None,
        input_size: Optional[tuple[int, int]] = None,
        fallback: bool = False,
        track: bool = False,
    ) -> None: ...
    def process(self, frame: Frame, *, bgr: bool = False, dense: bool = False) -> Result:
        """ERSM on one frame, and the dense baseline when `dense=True`. The
        array is read in place (BGR is swapped into a copy); the GIL is
        released while it runs. Raises TypeError/ValueError for an array
        that is not H×W×3 uint8 C-contiguous, ersm.Error for a frame that fails."""
    def new_stream(self) -> None:
        """Forgets the frames before (track=True): the next starts a new stream."""
    @property
    def tracking(self) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> Literal["classifier", "detector"]: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def input_size(self) -> tuple[int, int]:
        """The network's input (width, height)."""
    @property
    def device(self) -> str: ...
    @property
    def placement(self) -> str: ...
    @property
    def threads(self) -> int: ...

class VideoSource:
    """Frames by the CLI's `--source` URIs: v4l2:///dev/video0, csi://0,
    rtsp://…, a video file, an image or a folder of images."""

    def __init__(
        self, uri: str, *, width: int = 0, height: int = 0, fps: float = 0.0, loop: bool = False
    ) -> None: ...
    def capture(self) -> Optional[Frame]:
        """The next RGB frame, or None at the end of the stream."""
    def __iter__(self) -> Iterator[Frame]: ...
    def __next__(self) -> Frame: ...
    def close(self) -> None:
        """Stops reading; a later capture raises ersm.Error."""
    def __enter__(self) -> "VideoSource": ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    @property
    def uri(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def is_live(self) -> bool: ...
    @property
    def fps(self) -> float: ...
    @property
    def frame_count(self) -> Optional[int]: ...
    @property
    def frame_name(self) -> str: ...

class VideoOutput:
    """Overlays by the CLI's `--output` URIs: a video file or PNG folder,
    http://HOST:PORT (live viewer, MJPEG, /metrics, /status), rtp:// or
    rtsp://. `anonymize`: "blur", "mosaic" or "solid" covers the faces (a
    face stays covered `hold` frames after it was last seen)."""

    def __init__(
        self,
        uri: str,
        *,
        fps: float = 30.0,
        anonymize: Optional[Literal["blur", "mosaic", "solid"]] = None,
        hold: int = 3,
    ) -> None: ...
    def render(self, frame: Frame, result: Result, *, bgr: bool = False) -> None:
        """Draws `frame` with its `result` and sends it on."""
    def close(self) -> None:
        """Finishes the output; raises ersm.Error naming what failed."""
    def __enter__(self) -> "VideoOutput": ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    @property
    def uri(self) -> str: ...
    @property
    def address(self) -> Optional[str]:
        """The viewer's http:// address, for an http:// output."""
    @property
    def frames(self) -> int: ...
