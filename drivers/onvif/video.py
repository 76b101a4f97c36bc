"""Video checks on camera snapshots: video loss (black, frozen), tamper (blocked, defocused), motion.

Three layers, each usable from a REPL:

* :func:`analyze` is pure CPU work on one JPEG snapshot: it decodes it small and grey
  (about 320 px wide), measures brightness, contrast, sharpness and the change against
  the previous snapshot, and gives verdicts. What it must remember between snapshots (the
  previous picture, how long the picture has been still, the learned sharpness baseline)
  travels in the :class:`FrameStats` it returns, which the caller hands back next time.
* :class:`VideoMonitor` (one per camera) debounces verdicts into ``camera.video_loss``,
  ``camera.tamper`` and ``camera.motion`` observations, active and cleared.
* :class:`VideoChecker` (one for all cameras) runs :func:`analyze` off the event loop on a
  small thread pool, with a per-frame timeout and a bound on queued work.

OpenCV (with numpy, about 226 MB) is the optional extra ``campus-gateway[video]``. It is
imported only by :func:`require_cv2`, never when ``drivers.onvif`` is imported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.errors import ConfigError
from gateway.events import DeviceRef, EventState, Observation, Severity

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Gray = NDArray[np.uint8]

VIDEO_LOSS = "camera.video_loss"
TAMPER = "camera.tamper"
MOTION = "camera.motion"

INSTALL_HINT = "pip install 'campus-gateway[video]'"

# Pictures are analysed at most this wide (grey). 320 x 180 for a 16:9 camera keeps a person
# at the far end of a school corridor at a few dozen pixels, enough for motion and sharpness,
# and costs a few milliseconds per snapshot. Decoding uses libjpeg's DCT scaling (1/2, 1/4,
# 1/8), far cheaper than a full decode and a resize.
ANALYSIS_WIDTH = 320
# Snapshots larger than this are refused before decoding: 8K (33 MP) is the largest camera
# sensor in the field; a bigger header is a corrupt or hostile reply (decompression bomb).
MAX_PIXELS = 40_000_000
# A complete JPEG ends with the EOI marker; some cameras pad a few bytes after it. A
# truncated snapshot (cut off mid-transfer) would otherwise decode as a grey lower half.
EOI_SEARCH = 64

# The shared pool: 2 workers. Analysis holds the GIL for little of its time (OpenCV releases
# it), so 2 threads use both cores of the typical gateway box at worst, leaving the loop
# responsive; one snapshot costs a few ms, so 2 workers handle hundreds of cameras at 10 s.
WORKERS = 2
# Snapshots accepted (queued or running) at once: beyond this a frame is rejected, not queued.
# 8 is 4 per worker, tens of ms of work: a longer queue only means stale pictures.
MAX_PENDING = 8
# On exit, how long to wait for analyses already running (they cannot be interrupted).
SHUTDOWN_TIMEOUT = 2.0


class VideoCheckConfig(BaseModel):
    """Video checks of one camera (thresholds are grey levels 0-255 at the analysis size)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 10 s: a covered or dead camera is reported within about half a minute (3 snapshots),
    # 50 cameras cost about 1 % of one core, and cheap cameras (which take 0.2-0.5 s to
    # produce a snapshot) are not loaded by constant snapshot requests.
    interval: float = Field(default=10.0, ge=1.0, le=3600.0, description="seconds between snapshots")
    # 2 s: analysis takes a few ms; a frame still unfinished after 2 s means the machine is
    # starved, and waiting longer would only stack snapshots behind it (kept below interval).
    timeout: float = Field(default=2.0, gt=0, le=60.0, description="seconds allowed to analyse a snapshot")
    # 3 frames (30 s at 10 s): one odd snapshot (a truck's headlights, an IR switch-over, a
    # person leaning on the pole) never raises or clears an alarm on its own.
    debounce_frames: int = Field(
        default=3, ge=1, le=100, description="consecutive bad (good) snapshots before active (cleared)"
    )

    # Black: 16 is video black in studio range (BT.601); a night scene under IR averages
    # 40-120. Both conditions, because a dark scene with lit windows is dark on average but
    # has contrast: only a picture that is dark *and* flat is a lost signal.
    black_max_brightness: float = Field(default=16.0, ge=0, le=255, description="mean at or below: dark")
    black_max_contrast: float = Field(default=8.0, ge=0, le=128, description="std dev at or below: flat")

    # Blocked: natural scenes have a standard deviation of 30-70 grey levels at 320 px; a hand,
    # a cap, paint or a bag over the lens leaves 2-10 (vignetting and noise). 12 leaves room
    # for fog and a plain wall in bad light, which are above 15 in practice.
    blocked_max_contrast: float = Field(
        default=12.0, ge=0, le=128, description="std dev at or below (and not black): view covered"
    )

    # Frozen: a still picture is byte-identical to the previous snapshot, or differs by at most
    # 0.1 grey levels on average *and* has no pixel changed by more than motion_pixel_diff.
    # A frozen camera repeats the same bytes, or re-encodes its last picture (measured: 0.02).
    # A live camera differs by more: even sensor noise of 0.5 grey levels at full size gives
    # 0.27 after compression, typical noise 0.5-1, and the on-screen clock most cameras burn in
    # changes a few dozen pixels by far more than 25 every second. Not caught: a frozen picture
    # re-encoded at a varying quality (one JPEG quality step: 0.29), as live as noise to this test.
    frozen_max_diff: float = Field(
        default=0.1, ge=0, le=255, description="mean abs difference at or below: maybe the same picture"
    )
    frozen_max_changed: float = Field(
        default=0.0, ge=0, le=1, description="fraction of changed pixels at or below: maybe the same picture"
    )
    # 60 s and 3 snapshots: a camera with strong temporal noise reduction watching an empty
    # corridor can give near-identical snapshots for a while; a frozen encoder stays frozen.
    frozen_after: float = Field(default=60.0, ge=0, le=86400.0, description="seconds still before frozen")
    frozen_frames: int = Field(default=3, ge=1, le=1000, description="still snapshots in a row before frozen")

    # Defocused: sharpness is the variance of the Laplacian. The baseline is learned from good
    # snapshots: a running mean over the first 6 (1 min at 10 s) before judging, then a moving
    # average over 360 (1 h): slow enough that a focus ring turned over minutes is still caught,
    # fast enough to follow dusk and dawn.
    baseline_frames: int = Field(default=6, ge=1, le=10000, description="good snapshots before judging")
    baseline_window: int = Field(default=360, ge=1, le=100000, description="snapshots the baseline averages")
    # 0.3: a focus ring turned or a lens smeared with grease drops sharpness below a fifth of
    # normal; day-night (IR) switch-overs and rain on the dome stay above half.
    defocus_ratio: float = Field(
        default=0.3, gt=0, lt=1, description="sharpness below this fraction of the baseline: defocused"
    )
    # 4: a sharp scene at 320 px scores 100-2000; a fully defocused one under 2. The floor
    # catches a camera defocused before the baseline was learned (e.g. at installation).
    defocus_floor: float = Field(default=4.0, ge=0, description="sharpness below this: defocused")

    # Motion, for cameras without analytics of their own (off by default: most have them).
    motion: bool = Field(default=False, description="publish camera.motion from snapshot differences")
    # 25 grey levels: noise and JPEG artefacts stay under 10 at 320 px; a person against a
    # background differs by 30 or more. The mean brightness change is subtracted first, so an
    # exposure step is not motion.
    motion_pixel_diff: float = Field(default=25.0, gt=0, le=255, description="a pixel changed by more")
    # 0.5 % of the picture (about 290 pixels at 320 x 180): a person at 20 m in a 90 degree view.
    motion_min_fraction: float = Field(
        default=0.005, gt=0, le=1, description="fraction of changed pixels for motion"
    )
    # 1: snapshots are 10 s apart, so a person crossing the view is in one snapshot at most.
    motion_debounce_frames: int = Field(
        default=1, ge=1, le=100, description="snapshots with (without) motion before active (cleared)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.timeout >= self.interval:
            raise ValueError("timeout must be shorter than interval")
        if self.black_max_contrast > self.blocked_max_contrast:
            raise ValueError("black_max_contrast must not exceed blocked_max_contrast")
        return self


# -- errors -------------------------------------------------------------------------------


class VideoCheckError(Exception):
    """A snapshot could not be checked. ``reason`` is a stable code; the driver converts
    :class:`UndecodableFrame` into a DeviceProtocolError and counts the others."""

    reason: ClassVar[str] = "error"


class UndecodableFrame(VideoCheckError):
    """The snapshot is not a complete, decodable JPEG (truncated, HTML error page, garbage)."""

    reason = "undecodable"


class CheckTimeout(VideoCheckError):
    """The analysis did not finish within ``timeout``; the frame is skipped."""

    reason = "timeout"


class CheckerBusy(VideoCheckError):
    """The shared pool already holds ``max_pending`` snapshots; the frame is skipped."""

    reason = "busy"


class VideoSupportMissing(ConfigError):
    """Video checks are configured but OpenCV (the ``video`` extra) is not installed."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "video checks",
            [("", f"OpenCV is not installed ({detail}); install the video extra: {INSTALL_HINT}")],
        )


# -- OpenCV, loaded on demand ----------------------------------------------------------------

_cv2: ModuleType | None = None
_cv2_lock = threading.Lock()


def require_cv2() -> ModuleType:
    """The ``cv2`` module, imported on first use; :class:`VideoSupportMissing` if absent."""
    global _cv2  # noqa: PLW0603 - one lazily imported module, cached
    if _cv2 is not None:
        return _cv2
    with _cv2_lock:
        if _cv2 is None:
            try:
                import cv2
            except ImportError as exc:
                raise VideoSupportMissing(str(exc)) from exc
            # One thread inside OpenCV: our pool bounds the concurrency, and OpenCV's own pool
            # (one thread per core) would compete with the event loop for the same cores.
            cv2.setNumThreads(1)
            _cv2 = cv2
    return _cv2


# -- analysis -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class FrameStats:
    """What one snapshot showed, and the state the next analysis needs.

    ``at`` is ``time.monotonic()`` when the snapshot was taken. ``diff`` (mean absolute
    difference) and ``changed`` (fraction of changed pixels, brightness-compensated) are
    against the previous snapshot, None without one of the same size.
    """

    at: float
    width: int
    height: int
    brightness: float
    contrast: float
    sharpness: float
    diff: float | None
    changed: float | None
    still_since: float | None  # ``at`` of the first snapshot of the current still run
    still_frames: int  # snapshots in a row equal to their predecessor
    sharpness_baseline: float | None
    baseline_frames: int
    black: bool
    frozen: bool
    blocked: bool
    defocused: bool
    motion: bool
    digest: bytes = field(repr=False)
    image: Gray = field(repr=False)

    @property
    def video_loss(self) -> str | None:
        """``black`` or ``frozen``, or None."""
        return "black" if self.black else "frozen" if self.frozen else None

    @property
    def tamper(self) -> str | None:
        """``blocked`` or ``defocused``, or None."""
        return "blocked" if self.blocked else "defocused" if self.defocused else None

    def summary(self) -> dict[str, float]:
        """The measurements, rounded, for event data and status."""
        out = {
            "brightness": round(self.brightness, 1),
            "contrast": round(self.contrast, 1),
            "sharpness": round(self.sharpness, 1),
        }
        if self.sharpness_baseline is not None:
            out["sharpness_baseline"] = round(self.sharpness_baseline, 1)
        if self.changed is not None:
            out["changed"] = round(self.changed, 4)
        if self.still_since is not None:
            out["still_seconds"] = round(self.at - self.still_since, 1)
        return out


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding; UndecodableFrame if none."""
    if data[:2] != b"\xff\xd8":
        raise UndecodableFrame("not a JPEG (no start-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise UndecodableFrame(f"corrupt JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in _SOF and i + 9 <= n:
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            if width == 0 or height == 0:
                raise UndecodableFrame(f"JPEG frame header gives {width} x {height}")
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise UndecodableFrame("JPEG without a frame header")


def decode(jpeg: bytes) -> Gray:
    """The snapshot in grey, at most :data:`ANALYSIS_WIDTH` wide (DCT-scaled, then resized)."""
    cv2 = require_cv2()
    import numpy as np

    width, height = jpeg_size(jpeg)
    if width * height > MAX_PIXELS:
        raise UndecodableFrame(f"JPEG of {width} x {height} is larger than any camera's")
    if b"\xff\xd9" not in jpeg[-EOI_SEARCH:]:
        raise UndecodableFrame("truncated JPEG (no end-of-image marker)")
    factor = next((f for f in (8, 4, 2) if width // f >= ANALYSIS_WIDTH), 1)
    flags = {
        1: cv2.IMREAD_GRAYSCALE,
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    }
    try:
        img: Gray | None = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), flags[factor])
    except cv2.error as exc:
        raise UndecodableFrame(f"OpenCV could not decode the JPEG: {exc}") from exc
    if img is None or img.size == 0:
        raise UndecodableFrame("OpenCV could not decode the JPEG")
    w = img.shape[1]
    if w > ANALYSIS_WIDTH:
        size = (ANALYSIS_WIDTH, max(1, round(img.shape[0] * ANALYSIS_WIDTH / w)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


def analyze(
    jpeg: bytes, previous: FrameStats | None, cfg: VideoCheckConfig, *, at: float | None = None
) -> FrameStats:
    """Measure one snapshot and judge it, given the stats of the previous one (or None).

    Pure CPU work (a few ms): call it through :class:`VideoChecker`, never on the event loop.
    Raises :class:`UndecodableFrame` for anything that is not a complete JPEG.
    """
    cv2 = require_cv2()
    import numpy as np

    at = time.monotonic() if at is None else at
    img = decode(jpeg)
    digest = hashlib.blake2b(jpeg, digest_size=16).digest()
    mean, std = cv2.meanStdDev(img)
    brightness, contrast = float(mean[0][0]), float(std[0][0])
    lap = cv2.Laplacian(img, cv2.CV_16S)
    sharpness = float(cv2.meanStdDev(lap)[1][0][0]) ** 2

    black = brightness <= cfg.black_max_brightness and contrast <= cfg.black_max_contrast
    blocked = not black and contrast <= cfg.blocked_max_contrast
    flat = black or blocked  # no texture: stillness and sharpness say nothing

    prev = previous if previous is not None and previous.image.shape == img.shape else None
    diff = changed = None
    if prev is not None:
        diff = float(cv2.norm(img, prev.image, cv2.NORM_L1)) / img.size
        offset = round(brightness - prev.brightness)  # an exposure step is not motion
        delta = np.abs(img.astype(np.int16) - prev.image.astype(np.int16) - offset)
        changed = float(np.count_nonzero(delta > cfg.motion_pixel_diff)) / img.size

    still = (
        prev is not None
        and not flat
        and (
            digest == prev.digest
            or (
                diff is not None
                and changed is not None
                and diff <= cfg.frozen_max_diff
                and changed <= cfg.frozen_max_changed
            )
        )
    )
    if still and prev is not None:
        still_since = prev.still_since if prev.still_since is not None else prev.at
        still_frames = prev.still_frames + 1
    else:
        still_since, still_frames = None, 0
    frozen = (
        still_since is not None and still_frames >= cfg.frozen_frames and at - still_since >= cfg.frozen_after
    )

    baseline = previous.sharpness_baseline if previous is not None else None
    learned = previous.baseline_frames if previous is not None else 0
    defocused = not flat and (
        sharpness < cfg.defocus_floor
        or (
            baseline is not None
            and learned >= cfg.baseline_frames
            and sharpness < baseline * cfg.defocus_ratio
        )
    )
    if not flat and not defocused and not frozen:
        learned += 1
        weight = 1.0 / min(learned, cfg.baseline_window)  # running mean, then moving average
        baseline = sharpness if baseline is None else baseline + weight * (sharpness - baseline)

    motion = (
        prev is not None
        and changed is not None
        and not flat
        and not prev.black
        and not prev.blocked
        and changed >= cfg.motion_min_fraction
    )
    return FrameStats(
        at=at,
        width=int(img.shape[1]),
        height=int(img.shape[0]),
        brightness=brightness,
        contrast=contrast,
        sharpness=sharpness,
        diff=diff,
        changed=changed,
        still_since=still_since,
        still_frames=still_frames,
        sharpness_baseline=baseline,
        baseline_frames=learned,
        black=black,
        frozen=frozen,
        blocked=blocked,
        defocused=defocused,
        motion=motion,
        digest=digest,
        image=img,
    )


# -- debounced state per camera ------------------------------------------------------------


class _Debounce:
    """One condition: ``frames`` bad snapshots in a row to become active, as many good to clear."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.active_reason: str | None = None
        self._count = 0

    def update(self, reason: str | None) -> tuple[EventState, str] | None:
        """Feed one snapshot's reason (None: good); the transition it completes, if any."""
        if self.active_reason is None:
            if reason is None:
                self._count = 0
                return None
            self._count += 1
            if self._count < self.frames:
                return None
            self.active_reason, self._count = reason, 0
            return EventState.ACTIVE, reason
        if reason is not None:
            self._count = 0
            return None
        self._count += 1
        if self._count < self.frames:
            return None
        cleared, self.active_reason, self._count = self.active_reason, None, 0
        return EventState.CLEARED, cleared


class VideoMonitor:
    """Debounced video state of one camera: observations when a condition starts or ends.

    ``camera.video_loss`` (reason ``black`` or ``frozen``) and ``camera.tamper`` (``blocked``
    or ``defocused``) need ``debounce_frames`` bad snapshots in a row to become active and
    as many good ones to clear; the active event's reason is kept until it clears.
    ``camera.motion`` only with ``motion: true``.
    """

    SEVERITY: ClassVar[dict[str, Severity]] = {
        VIDEO_LOSS: Severity.MAJOR,
        TAMPER: Severity.MAJOR,
        MOTION: Severity.INFO,
    }

    def __init__(self, device: DeviceRef, cfg: VideoCheckConfig) -> None:
        self.device = device
        self.cfg = cfg
        self._conditions = {
            VIDEO_LOSS: _Debounce(cfg.debounce_frames),
            TAMPER: _Debounce(cfg.debounce_frames),
        }
        if cfg.motion:
            self._conditions[MOTION] = _Debounce(cfg.motion_debounce_frames)

    @property
    def active(self) -> dict[str, str]:
        """Active conditions and their reasons, for status reports."""
        return {t: d.active_reason for t, d in self._conditions.items() if d.active_reason is not None}

    def update(self, stats: FrameStats, *, now: float | None = None) -> list[Observation]:
        """Feed one snapshot's stats; the observations of the transitions it completes."""
        occurred_at = time.time() if now is None else now
        reasons = {
            VIDEO_LOSS: stats.video_loss,
            TAMPER: stats.tamper,
            MOTION: "motion" if stats.motion else None,
        }
        out = []
        for event_type, debounce in self._conditions.items():
            transition = debounce.update(reasons[event_type])
            if transition is None:
                continue
            state, reason = transition
            out.append(
                Observation(
                    device=self.device,
                    type=event_type,
                    severity=self.SEVERITY[event_type],
                    state=state,
                    occurred_at=occurred_at,
                    data={"reason": reason, **stats.summary()},
                )
            )
        return out


# -- the shared checker ------------------------------------------------------------------------


@dataclass
class CheckerCounters:
    """What the shared checker did since it started."""

    analyzed: int = 0
    undecodable: int = 0
    timeouts: int = 0
    rejected: int = 0
    cpu_seconds: float = 0.0  # thread CPU time spent in analyze

    def as_dict(self) -> dict[str, float]:
        return {
            "analyzed": self.analyzed,
            "undecodable": self.undecodable,
            "timeouts": self.timeouts,
            "rejected": self.rejected,
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


class VideoChecker:
    """Runs :func:`analyze` for all cameras on one small thread pool, off the event loop.

    ``async with VideoChecker() as checker: stats = await checker.check(jpeg, prev, cfg)``.
    At most ``max_pending`` snapshots are queued or running: beyond that :class:`CheckerBusy`.
    A snapshot not analysed within ``cfg.timeout`` raises :class:`CheckTimeout`; the work
    itself cannot be interrupted, so it keeps its place in ``max_pending`` until it ends,
    and a stuck analysis never lets the queue grow.
    """

    def __init__(self, *, workers: int = WORKERS, max_pending: int = MAX_PENDING) -> None:
        if workers < 1 or max_pending < workers:
            raise ValueError("need workers >= 1 and max_pending >= workers")
        self.workers = workers
        self.max_pending = max_pending
        self.counters = CheckerCounters()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: set[concurrent.futures.Future[FrameStats]] = set()
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Snapshots queued or being analysed (timed-out ones included until they end)."""
        with self._lock:
            return len(self._pending)

    async def __aenter__(self) -> Self:
        require_cv2()  # a missing extra fails at start, not at the first snapshot
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="video-check"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = [asyncio.wrap_future(f) for f in self._pending if not f.done()]
        if running:
            await asyncio.wait(running, timeout=SHUTDOWN_TIMEOUT)

    async def check(
        self, jpeg: bytes, previous: FrameStats | None, cfg: VideoCheckConfig, *, at: float | None = None
    ) -> FrameStats:
        """Analyse one snapshot on the pool. Raises :class:`UndecodableFrame`,
        :class:`CheckTimeout` or :class:`CheckerBusy` (all :class:`VideoCheckError`)."""
        if self._executor is None:
            raise RuntimeError("VideoChecker.check outside 'async with'")
        taken = time.monotonic() if at is None else at
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.counters.rejected += 1
                raise CheckerBusy(f"{len(self._pending)} snapshots already pending")
            future = self._executor.submit(self._run, jpeg, previous, cfg, taken)
            self._pending.add(future)
        future.add_done_callback(self._done)
        try:
            async with asyncio.timeout(cfg.timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError as exc:
            with self._lock:
                self.counters.timeouts += 1
            raise CheckTimeout(f"snapshot not analysed within {cfg.timeout} s") from exc

    def _run(self, jpeg: bytes, previous: FrameStats | None, cfg: VideoCheckConfig, at: float) -> FrameStats:
        start = time.thread_time()
        try:
            stats = analyze(jpeg, previous, cfg, at=at)
        except UndecodableFrame:
            with self._lock:
                self.counters.undecodable += 1
            raise
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.counters.cpu_seconds += spent
        with self._lock:
            self.counters.analyzed += 1
        return stats

    def _done(self, future: concurrent.futures.Future[FrameStats]) -> None:
        with self._lock:
            self._pending.discard(future)
