"""The data-product scan and the triggers built on it (``astra_provider.triggers.data_products``).

Triggers run on a real event loop against real files. The watcher's watermark goes through the real
``AssetStateStoreAccessors`` and the Execution API into the metadata database's ``asset_state_store``
table (``in_process_comms``); only the tests about running *without* a store use none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from data_product_helpers import WATCHED_ASSET, in_process_comms, make_product, set_age, sync_test_dags

from astra_provider.triggers.data_products import (
    PAYLOAD_KIND,
    WATERMARK_KEY,
    NewDataProductsEventTrigger,
    NewDataProductsTrigger,
    payload_paths,
    scan_data_products,
    watermark_from_json,
    watermark_to_json,
)
from astra_provider.triggers.scan import ScanReporter, find_misplaced

pytest_plugins = ["data_product_fixtures"]  # fixtures: airflow_db, astra_test_dags, astra_conn


async def _events(trigger, n: int, timeout: float = 30.0, settle: float = 0.3) -> list:
    """The first ``n`` events of ``trigger.run()``.

    Like the triggerer, the generator is resumed after the last event (it saves its watermark then);
    no further event may come within ``settle`` seconds.
    """
    events = []
    generator = trigger.run()
    try:
        async with asyncio.timeout(timeout):
            while len(events) < n:
                events.append(await generator.__anext__())
        try:
            async with asyncio.timeout(settle):
                extra = await generator.__anext__()
                pytest.fail(f"unexpected event {extra.payload}")
        except (TimeoutError, StopAsyncIteration):
            pass
    finally:
        await generator.aclose()
    return events


async def _no_event(trigger, seconds: float) -> None:
    """Assert that ``trigger`` emits nothing for ``seconds``."""
    generator = trigger.run()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(seconds):
                event = await generator.__anext__()
                pytest.fail(f"unexpected event {event.payload}")
    finally:
        await generator.aclose()


# The scanning core ----------------------------------------------------------------------------------


def test_scan_finds_requested_filetypes_in_mtime_order(tmp_path: Path) -> None:
    star = make_product(tmp_path, "apStar", 1, age=300)
    visit = make_product(tmp_path, "apVisit", 1, age=200)
    make_product(tmp_path, "specFull", 1, age=100)  # a file type that was not asked for
    (tmp_path / "apogee" / "notes.txt").write_text("not a product")
    hidden = star.parent / f".{star.name}.Xa81b2"  # rsync's temporary file while it copies
    hidden.write_bytes(b"partial")
    set_age(hidden, 400)
    # Matches the apStar glob but not the apStar path template (healpix directory inconsistent).
    bad = tmp_path / "apogee/1.4/stars/apo25m/9/1001/apStar-1.4-apo25m-2M99.fits"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"x")
    set_age(bad, 50)

    result = scan_data_products(tmp_path, min_age_seconds=10)

    assert [(f.path, f.filetype) for f in result.files] == [(str(star), "apStar"), (str(visit), "apVisit")]
    assert result.files[0].size == 64
    assert (result.ignored, result.pending, result.matched) == (1, 0, 3)
    assert result.watermark == (bad.stat().st_mtime, str(bad))  # the ignored file is not looked at again

    only_specfull = scan_data_products(tmp_path, filetypes=["specfull"], min_age_seconds=10)
    assert [f.filetype for f in only_specfull.files] == ["specFull"]


def test_scan_with_explicit_glob(tmp_path: Path) -> None:
    star = make_product(tmp_path, "apStar", 1)
    other = tmp_path / "incoming" / "a.fits"
    other.parent.mkdir()
    other.write_bytes(b"x")
    set_age(other, 600)

    result = scan_data_products(tmp_path, pattern="**/*.fits", min_age_seconds=10)

    assert {(f.path, f.filetype) for f in result.files} == {(str(star), "apStar"), (str(other), "full")}
    absolute = scan_data_products(tmp_path, pattern=str(tmp_path / "incoming" / "*.fits"), min_age_seconds=10)
    assert [f.path for f in absolute.files] == [str(other)]
    with pytest.raises(ValueError, match="unknown SDSS filetype"):
        scan_data_products(tmp_path, filetypes=["apStarr"])


def test_scan_skips_files_until_ready_and_then_only_newer_files(tmp_path: Path) -> None:
    old = make_product(tmp_path, "apStar", 1, age=600)
    fresh = make_product(tmp_path, "apStar", 2, age=0)

    first = scan_data_products(tmp_path, min_age_seconds=60)
    assert [f.path for f in first.files] == [str(old)]
    assert first.pending == 1
    assert first.watermark == (old.stat().st_mtime, str(old))

    again = scan_data_products(tmp_path, min_age_seconds=60, watermark=first.watermark)
    assert (again.files, again.pending, again.watermark) == ([], 1, first.watermark)

    set_age(fresh, 120)  # the writer finished two minutes ago
    later = scan_data_products(tmp_path, min_age_seconds=60, watermark=first.watermark)
    assert [f.path for f in later.files] == [str(fresh)]


def test_scan_by_ctime_sees_files_copied_with_their_original_mtime(tmp_path: Path) -> None:
    make_product(tmp_path, "apStar", 1, age=600)
    by_mtime = scan_data_products(tmp_path, min_age_seconds=0)
    by_ctime = scan_data_products(tmp_path, min_age_seconds=0, use_ctime=True)
    copied = make_product(tmp_path, "apStar", 2, age=3600)  # like rsync -a: an old mtime, a new ctime

    assert scan_data_products(tmp_path, min_age_seconds=0, watermark=by_mtime.watermark).files == []
    found = scan_data_products(tmp_path, min_age_seconds=0, watermark=by_ctime.watermark, use_ctime=True)
    assert [f.path for f in found.files] == [str(copied)]


def test_watermark_json_round_trip() -> None:
    watermark = (1795440008.2212345, "/data/apogee/x.fits")
    assert watermark_from_json(json.loads(json.dumps(watermark_to_json(watermark)))) == watermark
    assert watermark_from_json(None) is None and watermark_to_json(None) is None
    assert watermark_from_json(12.5) == (12.5, "")  # a bare mtime (older stores)
    assert watermark_from_json([12.5, "a"]) == (12.5, "a")


# Serialization ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trigger",
    [
        NewDataProductsEventTrigger(root="/data", min_age_seconds=5, max_files_per_event=10, asset_name="a"),
        NewDataProductsEventTrigger(root="/data", pattern="**/*.fits", emit_existing=False, use_ctime=True),
        NewDataProductsTrigger(root="/data", filetypes="apVisit", watermark={"mtime": 1.5, "path": "/d/x"}),
        NewDataProductsTrigger(root="/data", max_files=3, poll_interval=2),
    ],
    ids=["event", "event-glob", "sensor", "sensor-capped"],
)
def test_serialize_round_trip(trigger) -> None:
    from airflow.sdk._shared.module_loading import import_string
    from airflow.triggers.base import BaseEventTrigger

    classpath, kwargs = trigger.serialize()
    kwargs = json.loads(json.dumps(kwargs))  # plain JSON, as stored by the triggerer
    recreated = import_string(classpath)(**kwargs)
    assert type(recreated) is type(trigger)
    assert recreated.serialize() == (classpath, kwargs)
    if isinstance(trigger, BaseEventTrigger):  # watchers are identified by this hash
        assert BaseEventTrigger.hash(classpath, kwargs) == BaseEventTrigger.hash(*recreated.serialize())


@pytest.mark.parametrize("trigger_class", [NewDataProductsEventTrigger, NewDataProductsTrigger])
def test_unknown_keyword_is_refused(trigger_class) -> None:
    with pytest.raises(TypeError, match="unexpected keyword arguments: min_age"):
        trigger_class(root="/data", min_age=5)


# The sensor's trigger -----------------------------------------------------------------------------------


def _write_slowly(path: Path, chunks: int, pause: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        for _ in range(chunks):
            stream.write(b"\0" * 4096)
            stream.flush()
            time.sleep(pause)


def test_sensor_trigger_waits_for_a_file_still_being_written(tmp_path: Path) -> None:
    old = make_product(tmp_path, "apStar", 1, age=600)
    watermark = (old.stat().st_mtime, str(old))
    growing = tmp_path / "apogee/1.4/stars/apo25m/1/1002/apStar-1.4-apo25m-2M00000002.fits"
    writer = threading.Thread(target=_write_slowly, args=(growing, 8, 0.15))
    trigger = NewDataProductsTrigger(
        root=tmp_path, watermark=watermark_to_json(watermark), min_age_seconds=0.5, poll_interval=0.1
    )

    writer.start()
    (event,) = asyncio.run(_events(trigger, 1))
    finished = not writer.is_alive()
    writer.join()

    assert finished, "the trigger fired while the file was still being written"
    assert event.payload["status"] == "success"
    assert payload_paths(event.payload) == [str(growing)]  # not the old file (before the watermark)
    assert event.payload["counts"] == {"apStar": 1}
    assert growing.stat().st_size == 8 * 4096
    assert watermark_from_json(event.payload["watermark"]) == (growing.stat().st_mtime, str(growing))


def test_sensor_trigger_caps_the_batch(tmp_path: Path) -> None:
    paths = [make_product(tmp_path, "apVisit", i, age=600 - i) for i in range(5)]
    trigger = NewDataProductsTrigger(root=tmp_path, max_files=2, min_age_seconds=1, poll_interval=0.1)
    (event,) = asyncio.run(_events(trigger, 1))
    assert payload_paths(event.payload) == [str(p) for p in paths[:2]]
    assert event.payload["remaining"] == 3
    assert watermark_from_json(event.payload["watermark"]) == (paths[1].stat().st_mtime, str(paths[1]))


# The asset watcher's trigger -----------------------------------------------------------------------------


@pytest.fixture
def asset_state(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real asset state store of the watched test asset (emptied), through the in-process comms."""
    request.getfixturevalue("astra_test_dags")
    from airflow.sdk import Asset
    from airflow.sdk.execution_time.context import AssetStateStoreAccessors

    monkeypatch.setenv("ASTRA_TEST_WATCH_ROOT", str(tmp_path / "watch"))
    sync_test_dags()  # makes the asset active, as the DAG processor does
    with in_process_comms():
        store = AssetStateStoreAccessors(inlets=[Asset.ref(name=WATCHED_ASSET)])
        store.clear()
        yield store


def _watcher(root: Path, **kwargs) -> NewDataProductsEventTrigger:
    settings = {"min_age_seconds": 1.0, "poll_interval": 0.1, "asset_name": WATCHED_ASSET} | kwargs
    return NewDataProductsEventTrigger(root=root, **settings)


def test_watcher_keeps_its_watermark_in_the_asset_state_store(asset_state, tmp_path: Path) -> None:
    root = tmp_path / "watch"
    first = [make_product(root, "apStar", i, age=900 - i) for i in range(3)]
    first += [make_product(root, "apVisit", i, age=800 - i) for i in range(2)]

    trigger = _watcher(root, max_files_per_event=3)
    trigger.asset_state_store = asset_state
    events = asyncio.run(_events(trigger, 2))

    # One event per poll, each at most max_files_per_event paths, in (mtime, path) order.
    assert [payload_paths(e.payload) for e in events] == [
        [str(p) for p in first[:3]],
        [str(p) for p in first[3:]],
    ]
    assert [e.payload["counts"] for e in events] == [{"apStar": 3}, {"apVisit": 2}]
    assert [e.payload["remaining"] for e in events] == [2, 0]
    assert events[0].payload["kind"] == PAYLOAD_KIND
    assert events[1].payload["after"] == events[0].payload["watermark"]
    stored = asset_state.get(WATERMARK_KEY)
    assert watermark_from_json(stored) == (first[-1].stat().st_mtime, str(first[-1]))

    # A restarted trigger (new instance, same store) does not fire the old files again ...
    restarted = _watcher(root, max_files_per_event=3)
    restarted.asset_state_store = asset_state
    asyncio.run(_no_event(restarted, 1.5))
    # ... but does fire a new file, once it is ready.
    new = make_product(root, "apVisit", 7, age=0)
    (event,) = asyncio.run(_events(restarted, 1))
    assert payload_paths(event.payload) == [str(new)]
    assert watermark_from_json(asset_state.get(WATERMARK_KEY)) == (new.stat().st_mtime, str(new))


def test_watcher_can_start_after_the_existing_files(asset_state, tmp_path: Path) -> None:
    root = tmp_path / "watch"
    existing = [make_product(root, "apStar", i) for i in range(3)]
    trigger = _watcher(root, emit_existing=False)
    trigger.asset_state_store = asset_state

    async def scenario() -> list:
        generator = trigger.run()
        pending = asyncio.ensure_future(generator.__anext__())
        await asyncio.sleep(0.5)  # the first scan has set the watermark after the existing files
        new = make_product(root, "apStar", 10, age=5)
        event = await asyncio.wait_for(pending, 10)
        await generator.aclose()
        return [event, new]

    event, new = asyncio.run(scenario())
    assert payload_paths(event.payload) == [str(new)]
    assert str(existing[0]) not in payload_paths(event.payload)


def test_watcher_without_a_store_keeps_the_watermark_in_memory(tmp_path: Path) -> None:
    paths = [make_product(tmp_path, "apStar", i, age=100 - i) for i in range(2)]
    trigger = NewDataProductsEventTrigger(root=tmp_path, min_age_seconds=1, poll_interval=0.1)
    assert trigger.asset_state_store is None

    async def scenario() -> tuple:
        generator = trigger.run()
        first = await generator.__anext__()
        newer = make_product(tmp_path, "apStar", 5, age=2)
        second = await asyncio.wait_for(generator.__anext__(), 10)
        await generator.aclose()
        return first, second, newer

    first, second, newer = asyncio.run(scenario())
    assert payload_paths(first.payload) == [str(p) for p in paths]
    assert payload_paths(second.payload) == [str(newer)]


def test_large_scan_runs_off_the_event_loop(tmp_path: Path) -> None:
    """4,000 new files in one scan: handed on in capped events while the event loop keeps ticking."""
    n = 4000
    for i in range(n):
        make_product(tmp_path, "apVisit" if i % 4 else "apStar", i, age=600, size=8)
    trigger = NewDataProductsEventTrigger(
        root=tmp_path, min_age_seconds=1, poll_interval=0, max_files_per_event=1000
    )

    async def scenario() -> tuple:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        started = time.perf_counter()
        events = await _events(trigger, 4, timeout=120)
        elapsed = time.perf_counter() - started
        stop.set()
        await tick
        return events, gaps, elapsed

    events, gaps, elapsed = asyncio.run(scenario())
    paths = [p for e in events for p in payload_paths(e.payload)]
    assert len(paths) == len(set(paths)) == n
    assert [len(e.payload["paths"]) for e in events] == [1000] * 4
    assert sum(e.payload["counts"].get("apStar", 0) for e in events) == n // 4
    assert len(json.dumps(events[0].payload)) < 120_000  # a compact AssetEvent.extra
    assert elapsed < 60, f"4 scans of {n} files took {elapsed:.1f} s"
    # The loop kept ticking during the scans: a scan run on the loop itself ticks once per scan, with
    # each gap as long as a scan.
    assert len(gaps) >= 20, f"the event loop ticked {len(gaps)} times in {elapsed:.2f} s"
    assert max(gaps) < elapsed / 2, f"the event loop stalled for {max(gaps):.2f} s of {elapsed:.2f} s"


# Confinement, layout checks and what the scans report ------------------------------------------------


class _Records(logging.Handler):
    """A logger whose records are kept (what the trigger or sensor logged)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


def test_scan_never_takes_a_link_to_a_file_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inside = make_product(root, "apStar", 1)
    secret = tmp_path / "secret.fits"
    secret.write_bytes(b"\0" * 64)
    set_age(secret, 600)
    link = inside.parent.parent / "1002" / "apStar-1.4-apo25m-2M00000002.fits"  # a valid SDSS path
    link.parent.mkdir()
    link.symlink_to(secret)
    alias = inside.parent.parent / "1003" / "apStar-1.4-apo25m-2M00000003.fits"
    alias.parent.mkdir()
    alias.symlink_to(inside)  # a link that stays under the root is fine

    result = scan_data_products(root, min_age_seconds=1)

    assert sorted(f.path for f in result.files) == sorted([str(inside), str(alias)])
    assert result.skipped == [(str(link), f"outside the data root {root}, a link to {secret}")]
    glob_result = scan_data_products(root, pattern="**/*.fits", min_age_seconds=1)
    assert str(link) not in [f.path for f in glob_result.files]
    with pytest.raises(ValueError, match="must stay under the data root"):
        scan_data_products(root, pattern="../*.fits")
    with pytest.raises(ValueError, match="must stay under the data root"):
        scan_data_products(root, pattern=str(tmp_path / "*.fits"))


def test_scan_reports_why_a_matched_file_is_not_taken(tmp_path: Path) -> None:
    bad = tmp_path / "apogee/1.4/stars/apo25m/9/1001/apStar-1.4-apo25m-2M99.fits"  # healpix group wrong
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"x")
    set_age(bad, 50)
    result = scan_data_products(tmp_path, min_age_seconds=10)
    assert result.skipped == [
        (str(bad), "directories are inconsistent with the keywords of this apStar file")
    ]


def test_files_outside_the_sdss_layout_are_found_and_explained(tmp_path: Path) -> None:
    """A data root given one directory too high: the layout globs see nothing; the layout check does."""
    placed = make_product(tmp_path / "sas", "apStar", 1)
    deeper = make_product(tmp_path / "sas" / "extra", "apVisit", 2)  # <root>/extra/apogee/...
    make_product(tmp_path / "sas", "specFull", 3)  # not a watched file type: not reported

    assert [f.path for f in scan_data_products(tmp_path / "sas", min_age_seconds=1).files] == [str(placed)]
    misplaced = find_misplaced(tmp_path / "sas", ["apStar", "apVisit"])
    assert [path for path, _ in misplaced] == [str(deeper)]
    assert "not where the SDSS layout puts it" in misplaced[0][1] and "'**/apVisit-*.fits'" in misplaced[0][1]

    # The documented way to watch such a tree: a pattern. Files whose path ends in the SDSS layout keep
    # their file type; others are plain files.
    found = scan_data_products(tmp_path / "sas", pattern="**/apVisit-*.fits", min_age_seconds=1)
    assert [(f.path, f.filetype) for f in found.files] == [(str(deeper), "apVisit")]


def test_reporter_lists_each_file_once_and_a_status_when_something_changes(tmp_path: Path) -> None:
    captured = _Records("astra-test-reporter")
    make_product(tmp_path, "apStar", 1, age=600)
    young = make_product(tmp_path, "apStar", 2, age=0)
    bad = tmp_path / "apogee/1.4/stars/apo25m/9/1001/apStar-1.4-apo25m-2M99.fits"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"x")
    set_age(bad, 50)
    reporter = ScanReporter(captured.logger, str(tmp_path), "apStar (SDSS layout)", min_age_seconds=10)

    first = scan_data_products(tmp_path, min_age_seconds=10)
    assert reporter.status(first, "; next scan in 5 s") is True
    assert reporter.status(scan_data_products(tmp_path, min_age_seconds=10)) is False  # nothing changed
    set_age(young, 30)
    assert reporter.status(scan_data_products(tmp_path, min_age_seconds=10)) is True

    lines = captured.lines()
    assert (
        lines.count(f"Not taking {bad}: directories are inconsistent with the keywords of this apStar file")
        == 1
    )
    assert lines[1].startswith(
        f"Watching {tmp_path} for apStar (SDSS layout): 3 files match, 1 new and ready, 1 not ready yet"
    )
    assert "1 not ready yet (the newest modified 0 s ago; ready once unmodified for 10 s)" in lines[1]
    assert "1 not taken (each listed once)" in lines[1] and "; next scan in 5 s" in lines[1]
    assert "2 new and ready" in lines[2] and "not ready" not in lines[2]
    assert len(lines) == 3


def test_payload_paths_are_confined_to_the_watched_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = make_product(root, "apVisit", 1)
    (root / "escape.fits").symlink_to("/etc/hostname")
    captured = _Records("astra-test-payload")
    payload = {
        "kind": PAYLOAD_KIND,
        "root": str(root),
        "paths": [
            str(good.relative_to(root)),
            "../../../../etc/passwd",
            "/etc/shadow",
            "escape.fits",
            str(good),  # absolute, but under the root: fine
            17,
        ],
    }
    assert payload_paths(payload, root, logger=captured.logger) == [str(good), str(good)]
    refused = captured.lines(logging.WARNING)
    assert refused == [
        f"Refused path ../../../../etc/passwd: outside the data root {root}",
        f"Refused path /etc/shadow: outside the data root {root}",
        f"Refused path escape.fits: outside the data root {root}, a link to /etc/hostname",
        "Refused path 17: not a path",
    ]
    # A payload that claims another root (a forged event) is refused as a whole.
    assert payload_paths({**payload, "root": "/"}, root, logger=captured.logger) == []
    assert (
        captured.lines(logging.WARNING)[-1]
        == f"Refused path /: an event root other than the watched root {root}"
    )


def test_sensor_trigger_fails_on_a_missing_root_and_times_out_with_what_it_saw(tmp_path: Path) -> None:
    missing = NewDataProductsTrigger(root=tmp_path / "nope", poll_interval=0.1)
    (event,) = asyncio.run(_events(missing, 1))
    nearest = f"its nearest existing parent is {tmp_path}"
    assert event.payload == {
        "status": "error",
        "kind": "data_root",
        "message": f"data root {tmp_path / 'nope'} does not exist ({nearest})",
    }

    make_product(tmp_path, "apStar", 1, age=0)  # never ready within the deadline
    waiting = NewDataProductsTrigger(
        root=tmp_path, min_age_seconds=60, poll_interval=0.1, deadline=time.time() + 0.5
    )
    (event,) = asyncio.run(_events(waiting, 1))
    assert event.payload["status"] == "timeout"
    message = event.payload["message"]
    assert message.startswith(
        f"no new data products under {tmp_path} before the deadline; last scan: 1 files match, 1 not "
        "ready yet (the newest modified "
    )
    assert message.endswith(" s ago; ready once unmodified for 60 s)")


def test_watcher_waits_for_a_missing_root_and_logs_it(tmp_path: Path) -> None:
    root = tmp_path / "later"
    trigger = NewDataProductsEventTrigger(root=root, min_age_seconds=0.2, poll_interval=0.1)
    captured = _Records("astra-test-watcher")
    trigger._log = captured.logger  # what LoggingMixin.log returns

    async def scenario():
        generator = trigger.run()
        pending = asyncio.ensure_future(generator.__anext__())
        await asyncio.sleep(0.5)
        assert not pending.done()
        path = make_product(root, "apStar", 1, age=5)
        event = await asyncio.wait_for(pending, 10)
        await generator.aclose()
        return event, path

    event, path = asyncio.run(scenario())
    assert payload_paths(event.payload) == [str(path)]
    errors = captured.lines(logging.ERROR)
    assert errors == [
        f"Cannot watch data root {root} does not exist (its nearest existing parent is {tmp_path}); "
        "checking again every 0.1 s"
    ]


def test_defaults_hand_a_file_on_within_seconds() -> None:
    trigger = NewDataProductsEventTrigger(root="/data")
    sensor_trigger = NewDataProductsTrigger(root="/data")
    assert (trigger.min_age_seconds, trigger.poll_interval) == (5.0, 5.0)
    assert (sensor_trigger.min_age_seconds, sensor_trigger.poll_interval) == (5.0, 5.0)
