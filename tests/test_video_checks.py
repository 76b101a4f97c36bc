"""Video checks on synthesized camera snapshots: verdicts, debounced transitions, the shared checker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from drivers.onvif import video
from drivers.onvif.video import (
    MOTION,
    TAMPER,
    VIDEO_LOSS,
    CheckerBusy,
    CheckTimeout,
    FrameStats,
    UndecodableFrame,
    VideoCheckConfig,
    VideoChecker,
    VideoMonitor,
    VideoSupportMissing,
    analyze,
    jpeg_size,
)
from gateway.errors import ConfigError
from gateway.events import DeviceKind, DeviceRef, EventState, Observation, Severity

cv2 = pytest.importorskip("cv2")
np = pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parents[1]
W, H = 1280, 720
INTERVAL = 10.0
CAMERA = DeviceRef("cam-1", DeviceKind.CAMERA, "Corridor B", "main building")

_BACKGROUND: Any = None


def background() -> Any:
    """A textured scene (boxes, lines, a sign), the same every time."""
    global _BACKGROUND  # noqa: PLW0603 - built once per test session
    if _BACKGROUND is None:
        rng = np.random.default_rng(1)
        img = np.full((H, W, 3), (90, 100, 110), np.uint8)
        for _ in range(60):
            x, y = (int(v) for v in rng.integers(0, (W, H)))
            dx, dy = (int(v) for v in rng.integers(20, 200, 2))
            cv2.rectangle(img, (x, y), (x + dx, y + dy), [int(v) for v in rng.integers(20, 235, 3)], -1)
        for x in range(0, W, 40):
            cv2.line(img, (x, 0), (x, H), (40, 40, 40), 1)
        cv2.putText(img, "CORRIDOR B", (50, 100), cv2.FONT_HERSHEY_SIMPLEX, 2, (250, 250, 250), 3)
        _BACKGROUND = img
    return _BACKGROUND


def noisy(img: Any, seed: int, sigma: float = 3.0) -> Any:
    """Sensor noise, different per snapshot."""
    noise = np.random.default_rng(seed).standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def scene(seed: int, person: int | None = None) -> Any:
    """The scene with noise, and a person (a green block) at x = ``person`` if given."""
    img = background().copy()
    if person is not None:
        cv2.rectangle(img, (person, 300), (person + 80, 560), (30, 200, 30), -1)
    return noisy(img, seed)


def jpeg(img: Any, quality: int = 80) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return bytes(buf.tobytes())


@functools.cache
def normal(n: int) -> bytes:
    """Snapshot n of a live, textured scene with a person walking across it."""
    return jpeg(scene(n, person=100 + (n * 97) % (W - 200)))


@functools.cache
def still(n: int) -> bytes:
    """Snapshot n of a live scene with nothing moving (only sensor noise)."""
    return jpeg(scene(n))


@functools.cache
def black(n: int) -> bytes:
    return jpeg(noisy(np.zeros((H, W, 3), np.uint8) + 4, n, sigma=2.0))


@functools.cache
def blocked(n: int) -> bytes:
    """A lens covered by a hand or a bag: uniform grey, vignetted, noisy."""
    yy, xx = np.mgrid[0:H, 0:W]
    r = np.hypot((xx - W / 2) / W, (yy - H / 2) / H)
    grey = (95 - 20 * r).astype(np.float32)
    return jpeg(noisy(np.dstack([grey] * 3), n, sigma=2.0))


@functools.cache
def defocused(n: int, sigma: float = 8.0) -> bytes:
    return jpeg(cv2.GaussianBlur(scene(n, person=100 + (n * 97) % (W - 200)), (0, 0), sigma))


class Camera:
    """Feeds snapshots one interval apart through analyze and a VideoMonitor."""

    def __init__(self, cfg: VideoCheckConfig | None = None) -> None:
        self.cfg = cfg or VideoCheckConfig()
        self.monitor = VideoMonitor(CAMERA, self.cfg)
        self.stats: FrameStats | None = None
        self.at = 1000.0
        self.n = 0

    def feed(self, frame: bytes) -> list[Observation]:
        self.at += self.cfg.interval
        self.n += 1
        self.stats = analyze(frame, self.stats, self.cfg, at=self.at)
        return self.monitor.update(self.stats, now=1.7e9 + self.at)

    def feed_many(self, make: Any, count: int) -> list[list[Observation]]:
        return [self.feed(make(self.n + 1000)) for _ in range(count)]

    def learned(self) -> Camera:
        """Past the sharpness baseline's warm-up, every snapshot normal."""
        for obs in self.feed_many(normal, self.cfg.baseline_frames + 2):
            assert obs == []
        return self


def transitions(batches: list[list[Observation]]) -> list[tuple[int, str, str | None, str]]:
    """(index of the snapshot, type, state, reason) of every observation."""
    return [
        (i, o.type, o.state.value if o.state else None, o.data["reason"])
        for i, batch in enumerate(batches)
        for o in batch
    ]


# -- analyze: one verdict per kind of picture -----------------------------------------------------


def test_normal_scene_is_fine_and_learns_a_baseline() -> None:
    cam = Camera().learned()
    s = cam.stats
    assert s is not None
    assert (s.width, s.height) == (320, 180)
    assert (s.black, s.frozen, s.blocked, s.defocused) == (False, False, False, False)
    assert 60 < s.brightness < 200
    assert s.contrast > 20
    assert s.sharpness_baseline is not None
    assert s.sharpness > 100
    assert s.baseline_frames == cam.cfg.baseline_frames + 2
    assert s.motion  # the person moved between snapshots (reported only if enabled)


def test_black_picture() -> None:
    s = analyze(black(1), None, VideoCheckConfig(), at=0.0)
    assert s.black
    assert s.video_loss == "black"
    assert not s.blocked
    assert s.tamper is None
    assert s.brightness < 16


def test_blocked_picture_is_not_black() -> None:
    s = analyze(blocked(1), None, VideoCheckConfig(), at=0.0)
    assert s.blocked
    assert not s.black
    assert s.tamper == "blocked"
    assert s.video_loss is None
    assert not s.defocused  # a flat picture is blocked, not out of focus


def test_frozen_needs_repeats_over_time() -> None:
    cam = Camera().learned()
    frame = normal(500)
    for i in range(1, 10):
        cam.feed(frame)
        s = cam.stats
        assert s is not None
        assert s.still_frames == i - 1
        # The first copy differs from the previous live frame; the run starts there.
        assert s.frozen == (i - 1 >= 3 and (i - 1) * INTERVAL >= 60.0), i
    assert s.video_loss == "frozen"
    assert not s.motion


def test_frozen_also_when_the_last_picture_is_reencoded() -> None:
    cfg = VideoCheckConfig(frozen_after=20.0)
    frame = jpeg(scene(7))
    stats = None
    for i in range(5):
        stats = analyze(frame, stats, cfg, at=i * 10.0)
        frame = jpeg(cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR))
    assert stats is not None
    assert stats.diff is not None
    assert stats.diff > 0  # not byte-identical
    assert stats.frozen


def test_live_still_scene_with_noise_is_not_frozen() -> None:
    cfg = VideoCheckConfig(frozen_after=20.0)
    stats = None
    for i in range(8):
        stats = analyze(still(i), stats, cfg, at=i * 10.0)
        assert not stats.frozen
        assert not stats.motion


def test_uniform_repeated_picture_is_blocked_not_frozen() -> None:
    cfg = VideoCheckConfig(frozen_after=0.0, frozen_frames=1)
    frame = blocked(1)
    stats = None
    for i in range(4):
        stats = analyze(frame, stats, cfg, at=i * 10.0)
    assert stats is not None
    assert stats.blocked
    assert not stats.frozen  # without texture stillness says nothing


def test_defocused_against_the_learned_baseline() -> None:
    cam = Camera().learned()
    cam.feed(defocused(1))
    s = cam.stats
    assert s is not None
    assert s.defocused
    assert s.tamper == "defocused"
    assert not s.blocked  # still has contrast: a blurred scene, not a covered lens
    assert s.sharpness_baseline is not None
    assert s.sharpness < 0.3 * s.sharpness_baseline
    baseline = s.sharpness_baseline
    cam.feed(defocused(2))  # a defocused picture does not teach the baseline
    assert cam.stats is not None
    assert cam.stats.sharpness_baseline == baseline


def test_defocused_before_a_baseline_only_below_the_floor() -> None:
    cfg = VideoCheckConfig()
    assert not analyze(defocused(1), None, cfg, at=0.0).defocused  # no baseline yet
    s = analyze(defocused(1, sigma=20.0), None, cfg, at=0.0)
    assert s.sharpness < cfg.defocus_floor
    assert s.defocused


def test_mild_blur_is_not_defocus() -> None:
    cam = Camera().learned()
    cam.feed(jpeg(cv2.GaussianBlur(scene(3), (0, 0), 0.8)))
    assert cam.stats is not None
    assert not cam.stats.defocused


def test_motion_is_changed_pixels_not_exposure() -> None:
    cfg = VideoCheckConfig(motion=True)
    a = analyze(still(1), None, cfg, at=0.0)
    b = analyze(still(2), a, cfg, at=10.0)
    assert b.changed is not None
    assert b.changed < cfg.motion_min_fraction
    assert not b.motion
    c = analyze(jpeg(scene(3, person=600)), b, cfg, at=20.0)
    assert c.changed is not None
    assert c.changed > cfg.motion_min_fraction
    assert c.motion
    brighter = jpeg(np.clip(scene(4).astype(np.int16) + 30, 0, 255).astype(np.uint8))
    d = analyze(brighter, b, cfg, at=30.0)  # auto exposure stepped up: no motion
    assert d.diff is not None
    assert d.diff > 20
    assert not d.motion


def test_other_resolutions_are_analysed_at_the_same_width() -> None:
    cfg = VideoCheckConfig()
    big = jpeg(cv2.resize(scene(1), (1920, 1080)))
    small = jpeg(cv2.resize(scene(1), (320, 180)))
    tiny = jpeg(cv2.resize(scene(1), (176, 144)))
    assert (analyze(big, None, cfg).width, analyze(big, None, cfg).height) == (320, 180)
    assert analyze(small, None, cfg).width == 320
    assert analyze(tiny, None, cfg).width == 176
    assert jpeg_size(big) == (1920, 1080)
    # A change of resolution: no comparison with the previous picture.
    s = analyze(small, analyze(tiny, None, cfg), cfg)
    assert s.diff is None
    assert not s.motion


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<html><body>401 Unauthorized</body></html>",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        b"\xff\xd8" + b"\x00" * 100,
    ],
    ids=["empty", "html", "header-only", "garbage"],
)
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(UndecodableFrame):
        analyze(data, None, VideoCheckConfig())


def test_truncated_jpeg_is_undecodable() -> None:
    data = normal(1)
    with pytest.raises(UndecodableFrame, match="truncated"):
        analyze(data[: len(data) // 2], None, VideoCheckConfig())


def test_corrupt_scan_data_is_undecodable_or_analysed_never_a_crash() -> None:
    data = bytearray(normal(1))
    data[2000:2400] = b"\xff\x00\xff\xd0" * 100
    with contextlib.suppress(UndecodableFrame):
        analyze(bytes(data), None, VideoCheckConfig())


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    data = bytearray(normal(1))
    width, height = jpeg_size(bytes(data))
    at = bytes(data).index(height.to_bytes(2, "big") + width.to_bytes(2, "big"))
    data[at : at + 4] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(UndecodableFrame, match="larger"):
        analyze(bytes(data), None, VideoCheckConfig())


# -- config ---------------------------------------------------------------------------------


def test_config_is_frozen_and_strict() -> None:
    cfg = VideoCheckConfig()
    assert cfg.interval == 10.0
    with pytest.raises(ValueError, match="frozen"):
        cfg.interval = 5.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="Extra inputs"):
        VideoCheckConfig(treshold=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="timeout must be shorter"):
        VideoCheckConfig(interval=2.0, timeout=2.0)
    with pytest.raises(ValueError, match="black_max_contrast"):
        VideoCheckConfig(black_max_contrast=20.0, blocked_max_contrast=10.0)


# -- VideoMonitor: debounced transitions -------------------------------------------------------


def test_black_then_picture_returns() -> None:
    cam = Camera().learned()
    batches = cam.feed_many(black, 4) + cam.feed_many(normal, 4)
    assert transitions(batches) == [
        (2, VIDEO_LOSS, "active", "black"),
        (6, VIDEO_LOSS, "cleared", "black"),
    ]
    active = batches[2][0]
    assert active.severity is Severity.MAJOR
    assert active.device == CAMERA
    assert active.data["brightness"] < 16
    assert cam.monitor.active == {}


def test_single_bad_frames_never_raise_an_alarm() -> None:
    cam = Camera().learned()
    batches = []
    for _ in range(5):
        batches += cam.feed_many(black, 2) + cam.feed_many(normal, 1)
    assert transitions(batches) == []


def test_active_needs_consecutive_good_frames_to_clear() -> None:
    cam = Camera().learned()
    batches = cam.feed_many(black, 3) + cam.feed_many(normal, 2) + cam.feed_many(black, 1)
    batches += cam.feed_many(normal, 3)
    assert transitions(batches) == [(2, VIDEO_LOSS, "active", "black"), (8, VIDEO_LOSS, "cleared", "black")]
    assert cam.monitor.active == {}


def test_frozen_then_live_again() -> None:
    cam = Camera().learned()
    frame = normal(777)
    batches = [cam.feed(frame) for _ in range(10)] + cam.feed_many(normal, 3)
    # frozen from the 7th copy (6 still frames, 60 s), active after 3 frozen snapshots.
    assert transitions(batches) == [
        (8, VIDEO_LOSS, "active", "frozen"),
        (12, VIDEO_LOSS, "cleared", "frozen"),
    ]
    assert batches[8][0].data["still_seconds"] == 80.0


def test_blocked_then_uncovered() -> None:
    cam = Camera().learned()
    batches = cam.feed_many(blocked, 3)
    assert cam.monitor.active == {TAMPER: "blocked"}
    batches += cam.feed_many(normal, 3)
    assert transitions(batches) == [(2, TAMPER, "active", "blocked"), (5, TAMPER, "cleared", "blocked")]


def test_defocused_then_refocused() -> None:
    cam = Camera().learned()
    batches = cam.feed_many(defocused, 3) + cam.feed_many(normal, 3)
    assert transitions(batches) == [(2, TAMPER, "active", "defocused"), (5, TAMPER, "cleared", "defocused")]
    assert batches[2][0].data["sharpness_baseline"] > 100


def test_reason_kept_until_cleared() -> None:
    cam = Camera().learned()
    batches = cam.feed_many(blocked, 3) + cam.feed_many(defocused, 2) + cam.feed_many(normal, 3)
    assert transitions(batches) == [(2, TAMPER, "active", "blocked"), (7, TAMPER, "cleared", "blocked")]


def test_motion_events_only_when_enabled() -> None:
    quiet = Camera().learned()
    assert transitions(quiet.feed_many(normal, 3)) == []

    cam = Camera(VideoCheckConfig(motion=True))
    cam.feed_many(still, 3)  # no motion yet: nothing moves
    batches = cam.feed_many(normal, 2) + cam.feed_many(still, 2)
    assert transitions(batches) == [(0, MOTION, "active", "motion"), (3, MOTION, "cleared", "motion")]
    assert batches[0][0].severity is Severity.INFO
    assert batches[0][0].state is EventState.ACTIVE


def test_video_loss_and_tamper_are_independent() -> None:
    cam = Camera().learned()
    batches = cam.feed_many(blocked, 3) + cam.feed_many(black, 3) + cam.feed_many(normal, 3)
    assert transitions(batches) == [
        (2, TAMPER, "active", "blocked"),
        (5, VIDEO_LOSS, "active", "black"),
        (5, TAMPER, "cleared", "blocked"),
        (8, VIDEO_LOSS, "cleared", "black"),
    ]


# -- VideoChecker: off the loop, bounded, with a timeout --------------------------------------------


@pytest.fixture
def slow_analyze(monkeypatch: pytest.MonkeyPatch) -> float:
    """analyze sleeps this long (in the worker thread) before analysing: far beyond the
    50 ms timeouts below, so "timed out" and "still running" hold on a loaded box."""
    delay = 1.0
    real = video.analyze

    def sleepy(*args: Any, **kwargs: Any) -> FrameStats:
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "analyze", sleepy)
    return delay


async def test_checker_analyses_off_the_loop() -> None:
    cfg = VideoCheckConfig()
    async with VideoChecker() as checker:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        async with asyncio.TaskGroup() as tg:
            tick = tg.create_task(ticker())
            stats = None
            for n in range(4):
                stats = await checker.check(normal(n), stats, cfg)
            tick.cancel()
        assert stats is not None
        assert stats.baseline_frames == 4
        assert checker.counters.analyzed == 4
        assert checker.counters.cpu_seconds > 0
        assert checker.pending == 0
        assert ticks > 4  # the loop kept running while the frames were analysed


async def test_checker_many_cameras_at_once() -> None:
    cfg = VideoCheckConfig()
    frames = [normal(n) for n in range(6)]
    async with VideoChecker(workers=2, max_pending=6) as checker:
        results = await asyncio.gather(*(checker.check(f, None, cfg) for f in frames))
    assert [r.width for r in results] == [320] * 6
    assert checker.counters.as_dict()["analyzed"] == 6


async def test_checker_undecodable_frame() -> None:
    async with VideoChecker() as checker:
        with pytest.raises(UndecodableFrame) as err:
            await checker.check(b"<html>503</html>", None, VideoCheckConfig())
    assert err.value.reason == "undecodable"
    assert checker.counters.undecodable == 1
    assert checker.counters.analyzed == 0


async def test_checker_timeout_skips_the_frame(slow_analyze: float) -> None:
    cfg = VideoCheckConfig(timeout=0.05)
    frame = normal(1)
    async with VideoChecker(workers=1, max_pending=1) as checker:
        started = time.monotonic()
        with pytest.raises(CheckTimeout):
            await checker.check(frame, None, cfg)
        assert time.monotonic() - started < slow_analyze
        assert checker.counters.timeouts == 1
        # The timed-out analysis still runs and keeps its place: the next frame is refused
        # rather than queued behind it.
        assert checker.pending == 1
        with pytest.raises(CheckerBusy):
            await checker.check(frame, None, cfg)
        assert checker.counters.rejected == 1
        for _ in range(250):  # up to 5 s
            if not checker.pending:
                break
            await asyncio.sleep(0.02)
        assert checker.pending == 0
        stats = await checker.check(frame, None, VideoCheckConfig())
        assert stats.width == 320


async def test_checker_queue_is_bounded(slow_analyze: float) -> None:
    cfg = VideoCheckConfig(interval=60.0, timeout=30.0)  # the second waits for the first: no timeout
    frame = normal(1)
    async with VideoChecker(workers=1, max_pending=2) as checker:
        results = await asyncio.gather(
            *(checker.check(frame, None, cfg) for _ in range(5)), return_exceptions=True
        )
    ok = [r for r in results if isinstance(r, FrameStats)]
    busy = [r for r in results if isinstance(r, CheckerBusy)]
    assert (len(ok), len(busy)) == (2, 3)
    assert busy[0].reason == "busy"
    assert checker.counters.rejected == 3
    assert checker.counters.analyzed == 2


async def test_checker_exit_waits_for_running_work(slow_analyze: float) -> None:
    cfg = VideoCheckConfig(timeout=0.05)
    checker = VideoChecker(workers=1, max_pending=4)
    async with checker:
        with pytest.raises(CheckTimeout):
            await checker.check(normal(1), None, cfg)
    assert checker.pending == 0  # the running analysis ended before exit returned
    with pytest.raises(RuntimeError, match="outside"):
        await checker.check(normal(1), None, cfg)


def test_checker_rejects_a_nonsense_pool() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        VideoChecker(workers=2, max_pending=1)


# -- OpenCV stays optional -----------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_the_camera_driver_does_not_import_cv2() -> None:
    proc = _python(
        "import sys\n"
        "import drivers.onvif, drivers.onvif.video\n"
        "from drivers.onvif.video import VideoCheckConfig, VideoMonitor\n"
        "VideoCheckConfig()\n"
        "heavy = sorted(m for m in ('cv2', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "none"


def test_missing_opencv_tells_the_operator_what_to_install() -> None:
    proc = _python(
        "import sys\n"
        "sys.modules['cv2'] = None  # as if the extra were not installed\n"
        "from drivers.onvif.video import require_cv2, VideoSupportMissing\n"
        "try:\n"
        "    require_cv2()\n"
        "except VideoSupportMissing as exc:\n"
        "    print(exc)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'campus-gateway[video]'" in proc.stdout
    assert issubclass(VideoSupportMissing, ConfigError)
