"""The data-product scan and the triggers built on it (``astra_provider.triggers.data_products``).

Triggers run on a real event loop against real files. The watcher's watermark goes through the real
``AssetStateStoreAccessors`` and the Execution API into the metadata database's ``asset_state_store``
table (``in_process_comms``); only the tests about running *without* a store use none.
"""

from __future__ import annotations

import asyncio
import json
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
