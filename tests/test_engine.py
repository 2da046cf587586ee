"""Engine guarantees from the performance work: ship once, warm pools, chunking, bounded streaming."""

from __future__ import annotations

import gc
import itertools
import os
import select
import time

import numpy
import pytest
import zoo

import pickmap
from pickmap import imap, pmap
from pickmap import pool as pools
from pickmap.chunking import MAX_ADAPTIVE, Chunker

pytestmark = pytest.mark.timeout(60)
PROCESS = ("stdlib", "cloudpickle", "dill")


@pytest.mark.parametrize("name", PROCESS)
def test_callable_is_loaded_once_per_worker_per_call(name):
    func = zoo.CountsLoads(b"x" * 1000)
    pickmap.shutdown()

    def loads_by_pid(results):
        seen: dict[int, set[int]] = {}
        for pid, loads in results:
            seen.setdefault(pid, set()).add(loads)
        return seen

    first = loads_by_pid(pmap(func, range(64), backend=name, workers=2, chunksize=1))
    # 64 chunks, but each worker's counter did not move within the call
    assert all(len(counts) == 1 for counts in first.values()), first
    second = loads_by_pid(pmap(func, range(64), backend=name, workers=2, chunksize=1))
    # the same warm workers ran the second call, and each loaded it exactly once more
    assert second.keys() == first.keys(), (first, second)
    for pid, counts in second.items():
        assert counts == {next(iter(first[pid])) + 1}, (first, second)


def test_warm_pool_reuses_workers_across_calls():
    pickmap.shutdown()
    first = set(pmap(zoo.pid_of, range(40), backend="stdlib", workers=2, chunksize=1))
    second = set(pmap(zoo.pid_of, range(40), backend="stdlib", workers=2, chunksize=1))
    assert first and first == second
    assert os.getpid() not in first


def test_shutdown_stops_idle_workers():
    pids = set(pmap(zoo.pid_of, range(20), backend="stdlib", workers=2, chunksize=1))
    assert pools.idle_pool_count() >= 1
    pickmap.shutdown()
    assert pools.idle_pool_count() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or during the read
        return False


def test_idle_workers_exit_and_the_next_call_replaces_them(monkeypatch):
    pickmap.shutdown()
    monkeypatch.setenv("PICKMAP_IDLE_TIMEOUT", "0.2")
    first = set(pmap(zoo.pid_of, range(10), backend="stdlib", workers=2, chunksize=1))
    deadline = time.monotonic() + 10  # they leave on their own; wait, bounded, for that
    while time.monotonic() < deadline and any(_running(pid) for pid in first):
        time.sleep(0.05)
    second = set(pmap(zoo.pid_of, range(10), backend="stdlib", workers=2, chunksize=1))
    assert second and not (first & second)
    pickmap.shutdown()


def test_idle_exit_racing_a_new_call_loses_no_chunk(monkeypatch):
    # Workers leave after 50 ms idle; calls spaced around that make chunks
    # land on workers that are saying BYE. Every result must still arrive.
    pickmap.shutdown()
    monkeypatch.setenv("PICKMAP_IDLE_TIMEOUT", "0.05")
    for pause in (0.03, 0.045, 0.05, 0.055, 0.07) * 3:
        assert pmap(zoo.square, range(12), backend="stdlib", workers=2, chunksize=1) == [
            i * i for i in range(12)
        ]
        time.sleep(pause)
    pickmap.shutdown()


class _InertWorker:
    """Enough of a worker for WorkerPool's bookkeeping: nothing runs."""

    adopted_call = None

    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class _InertBackend:
    name = "inert"
    max_queued = 2
    keep_warm = True

    def start_worker(self, start: object) -> _InertWorker:
        return _InertWorker()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_worker_removed_as_unusable_wakes_the_call_first_in_line():
    pool = pools.WorkerPool(_InertBackend(), None, 1, 300.0)  # type: ignore[arg-type]
    held = pool.pick(call_id=3)
    assert held is not None
    assert pool.pick(call_id=1) is None  # the one worker is held: call 1 waits in line
    waiting = pool.turn_fd(1)
    assert waiting is not None and not _readable(waiting)
    # The worker is handed back and idles out before call 1 looks again; call 2 looks
    # first and removes it. The room it leaves is call 1's, who must be told.
    held.owner = None
    held.said_bye = True
    assert pool.pick(call_id=2) is None
    assert held.worker.killed and held not in pool.slots
    assert _readable(waiting)
    assert pool.pick(call_id=1) is not None
    pool.close(kill=True)


def test_a_pool_replaced_while_its_last_call_ends_is_closed_once(monkeypatch):
    # Another instance of a backend under the same name replaces the pool just as its
    # last call releases it: the release and the replacing acquire must not both close it.
    old = pools.acquire(_InertBackend(), None, 1, 300.0)  # type: ignore[arg-type]
    closes: list[bool] = []
    monkeypatch.setattr(old, "close", lambda kill=False: closes.append(kill))
    real_lock = pools._LOCK

    class ReplaceOnFirstExit:
        replaced = False

        def __enter__(self) -> None:
            real_lock.acquire()

        def __exit__(self, *exc: object) -> None:
            real_lock.release()
            if not self.replaced:  # right after release() let go of the lock
                self.replaced = True
                pools.release(pools.acquire(_InertBackend(), None, 1, 300.0))  # type: ignore[arg-type]

    monkeypatch.setattr(pools, "_LOCK", ReplaceOnFirstExit())
    pools.release(old)
    assert closes == [False]
    monkeypatch.setattr(pools, "_LOCK", real_lock)
    pools.shutdown()


def test_known_length_gives_each_worker_several_chunks():
    chunker = Chunker(iter(range(1000)), 1000, workers=2, chunksize=None)
    assert chunker.size == 125  # 1000 / (4 * 2)


def _drain_chunks(chunker: Chunker, seconds_per_item: float) -> list[int]:
    sizes = []
    while (got := chunker.next_chunk()) is not None:
        sizes.append(len(got[1]))
        chunker.observe(len(got[1]), len(got[1]) * seconds_per_item)
    return sizes


def test_slow_items_get_guided_chunks_that_shrink_to_single_items():
    # 48 items of ~18 ms on 2 workers: one blind item, then large chunks that
    # shrink as the input runs out, so the tail is balanced item by item.
    sizes = _drain_chunks(Chunker(iter(range(48)), 48, workers=2, chunksize=None, func=None), 0.018)
    assert sum(sizes) == 48
    assert sizes[0] == 1  # no timing yet
    assert max(sizes) <= 6  # never above the even split, 48 / (4 * 2)
    assert sizes[-3:] == [1, 1, 1]
    assert all(a >= b for a, b in itertools.pairwise(sizes[1:]))  # never growing
    assert len(sizes) < 20  # far fewer messages than 48 single items


def test_a_chunk_holds_at_most_a_tenth_of_a_second_of_work():
    sizes = _drain_chunks(Chunker(iter(range(400)), 400, workers=2, chunksize=None), 0.05)
    assert max(sizes) == 2  # 0.1 s / 0.05 s, though the even split allows 50
    assert sizes.count(2) >= 195


def test_slow_chunks_are_not_queued_ahead_near_the_end():
    chunker = Chunker(iter(range(48)), 48, workers=2, chunksize=None)
    assert chunker.wants_prefetch()  # no timing yet: keep the pipes full
    chunker.next_chunk()
    chunker.observe(1, 0.018)
    decisions = []  # (size of the chunk, may it be queued), asked before taking it
    while True:
        prefetch = chunker.wants_prefetch()
        got = chunker.next_chunk()
        if got is None:
            break
        decisions.append((len(got[1]), prefetch))
    assert decisions[0] == (5, True)  # 47 items left: far from the end
    assert [p for size, p in decisions if size < 5] == [False] * sum(
        1 for size, _ in decisions if size < 5
    )
    assert decisions[-1] == (1, False)  # the tail goes one chunk per worker at a time


def test_short_chunks_and_unknown_lengths_are_always_queued_ahead():
    fast = Chunker(iter(range(100)), 100, workers=2, chunksize=None)
    fast.next_chunk()
    fast.observe(1, 1e-6)
    while fast.next_chunk() is not None:
        assert fast.wants_prefetch()
    endless = Chunker(itertools.count(), None, workers=2, chunksize=None)
    endless.next_chunk()
    endless.observe(1, 1.0)
    assert endless.wants_prefetch()


def test_only_a_short_last_chunk_may_queue_behind_its_call_while_others_wait():
    fast = Chunker(iter(range(8)), 8, workers=2, chunksize=None)
    assert not fast.took_short_last(1)  # no timing yet
    fast.next_chunk()
    fast.observe(1, 1e-6)
    taken = []
    while (got := fast.next_chunk()) is not None:
        taken.append(fast.took_short_last(len(got[1])))
    assert taken[-1] and not any(taken[:-1])  # the last one only
    slow = Chunker(iter(range(8)), 8, workers=2, chunksize=None)
    slow.next_chunk()
    slow.observe(1, 0.02)
    while (got := slow.next_chunk()) is not None:
        assert not slow.took_short_last(len(got[1]))  # 20 ms items: other calls go first
    endless = Chunker(itertools.count(), None, workers=2, chunksize=None)
    endless.next_chunk()
    endless.observe(1, 1e-6)
    assert not endless.took_short_last(1)


def test_a_call_that_gets_no_second_worker_sends_a_short_rest_as_one_chunk():
    fast = Chunker(iter(range(100)), 100, workers=2, chunksize=None)
    fast.next_chunk()
    fast.observe(1, 1e-6)
    got = fast.next_chunk(alone=True)
    assert got is not None and got[0] == 1 and len(got[1]) == 99  # the rest, not a worker's share
    assert fast.next_chunk(alone=True) is None
    slow = Chunker(iter(range(100)), 100, workers=2, chunksize=None)
    slow.next_chunk()
    slow.observe(1, 0.001)  # 99 ms left: too much to hold a worker while others wait
    got = slow.next_chunk(alone=True)
    assert got is not None and len(got[1]) < 99
    fixed = Chunker(iter(range(100)), 100, workers=2, chunksize=7)
    fixed.observe(1, 1e-6)
    got = fixed.next_chunk(alone=True)
    assert got is not None and len(got[1]) == 7  # chunksize= is the caller's


def test_fast_items_never_get_chunks_below_a_message_worth_of_work():
    sizes = _drain_chunks(Chunker(iter(range(200_000)), 200_000, workers=2, chunksize=None), 1e-7)
    assert sizes[0] == 1
    assert min(sizes[1:-1]) >= 25_000  # the even split; 5 ms of work would be 50k items
    assert len(sizes) <= 10


def test_adaptive_chunks_grow_toward_the_target_and_stay_bounded():
    chunker = Chunker(iter(()), None, workers=2, chunksize=None)
    assert chunker.size == 1
    sizes = []
    for _ in range(30):
        chunker.observe(chunker.size, chunker.size * 1e-6)  # 1 µs per item
        sizes.append(chunker.size)
    assert sizes[:4] == [2, 4, 8, 16]  # at most doubling
    assert sizes[-1] == MAX_ADAPTIVE
    chunker.observe(100, 10.0)  # slow items: shrink at once
    assert chunker.size == 1


def test_chunksize_overrides_both():
    assert Chunker(iter(()), None, 2, chunksize=9).size == 9
    assert Chunker(iter(()), 10**6, 2, chunksize=9).size == 9


def test_imap_reads_an_endless_input_only_as_fast_as_it_is_consumed():
    pulled = itertools.count()
    source = (next(pulled) for _ in itertools.count())
    results = imap(zoo.square, source, backend="stdlib", workers=2)
    for _ in range(10):
        next(results)
    time.sleep(0.2)
    before = next(pulled)
    time.sleep(0.3)
    after = next(pulled)
    assert after == before + 1  # nothing read while nobody consumes
    assert before < 10 + 2 * 2 * 2 * MAX_ADAPTIVE  # bounded read-ahead
    results.close()


def test_cached_verdict_skips_the_ladder():
    from pickmap.probe import choose

    closure = zoo.make_closure(2)
    name, _, _, verdicts = choose(closure, [1])
    assert name == "cloudpickle" and [v.backend for v in verdicts] == ["stdlib", "cloudpickle"]
    name, _, _, verdicts = choose(closure, [1])
    assert name == "cloudpickle" and [v.backend for v in verdicts] == ["cloudpickle"]


def test_cached_verdict_is_rechecked_when_the_object_changes():
    import threading

    from pickmap.probe import choose

    scaler = zoo.Scaler(2)
    assert choose(scaler.scale, [1])[0] == "stdlib"
    scaler.lock = threading.Lock()  # a lock must stay shared: only threads can carry it
    assert choose(scaler.scale, [1])[0] == "thread"


def test_cache_does_not_keep_closures_alive():
    import gc
    import weakref

    closure = zoo.make_closure(3)
    pmap(closure, [1, 2])
    ref = weakref.ref(closure)
    del closure
    gc.collect()
    assert ref() is None


def _segments():
    from pickmap import _shm

    mine = f"pickmap-{os.getpid()}-"
    return {
        name
        for folder in _shm.segment_dirs()
        for name in os.listdir(folder)
        if name.startswith(mine)
    }


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_large_callable_is_shared_once_across_calls_and_removed_with_its_object(method):
    big = zoo.Big()
    before = _segments()
    expected = [len(big.data) + i for i in range(20)]
    for _ in range(3):
        assert (
            pmap(big.size_plus, range(20), backend="stdlib", workers=2, start_method=method)
            == expected
        )
    kept = _segments() - before
    assert len(kept) == 1  # one copy in shared memory, served to every call
    assert (
        pmap(big.size_plus, range(20), backend="stdlib", workers=2, start_method=method) == expected
    )
    assert _segments() - before == kept
    with pytest.raises(ValueError):
        pmap(big.fail, range(20), backend="cloudpickle", workers=2, start_method=method)
    del big
    gc.collect()
    assert _segments() == before  # removed with its object


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_an_object_changed_between_calls_is_sent_again(method):
    big = zoo.Big()
    kw = {"backend": "stdlib", "workers": 2, "start_method": method, "chunksize": 1}
    first = int(big.data[0])
    assert pmap(big.first_byte_plus_offset, [0, 0, 0], **kw) == [first] * 3
    assert pmap(big.first_byte_plus_offset, [0, 0, 0], **kw) == [first] * 3
    big.data[0] = (first + 1) % 256  # in place, inside the large buffer
    assert pmap(big.first_byte_plus_offset, [0, 0, 0], **kw) == [(first + 1) % 256] * 3
    big.offset = 1000  # a small attribute
    assert pmap(big.first_byte_plus_offset, [0, 0, 0], **kw) == [(first + 1) % 256 + 1000] * 3
    before = _segments()
    del big
    gc.collect()
    assert len(before - _segments()) == 1


@pytest.mark.parametrize("run", range(6))
def test_ordered_imap_never_waits_with_nothing_in_flight(run):
    # Emitting finished chunks frees room under the read-ahead cap; the loop
    # must dispatch again before it waits (this used to hang ~1 run in 6).
    results = imap(zoo.square, itertools.count(), backend="stdlib", workers=2, start_method="fork")
    assert list(itertools.islice(results, 3000))[-1] == 2999 * 2999
    results.close()


def test_keyboard_interrupt_is_never_collected_as_a_result():
    with pytest.raises(KeyboardInterrupt):
        pmap(zoo.interrupt_on, [1] * 3, range(3), backend="serial", return_exceptions=True)


def test_serial_always_uses_one_worker(monkeypatch):
    monkeypatch.setenv("PICKMAP_WORKERS", "3")
    assert pickmap.explain(zoo.square, [1], backend="serial").workers == 1


def test_fork_workers_started_by_a_call_inherit_its_callable_unserialized():
    pickmap.shutdown()
    func = zoo.CountsLoads(numpy.ones(2**18))  # large enough for shared memory
    before = _segments()
    results = pmap(func, range(16), backend="stdlib", workers=2, chunksize=1, start_method="fork")
    loads_here = zoo.CountsLoads.loads_in_this_process  # the probe's trial load, before the fork
    assert {loads for _, loads in results} == {loads_here}  # no worker loaded it
    assert _segments() == before
    # warm workers get it by SETUP on the next call: loaded once each
    again = pmap(func, range(16), backend="stdlib", workers=2, chunksize=1, start_method="fork")
    assert {loads for _, loads in again} == {loads_here + 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_concurrent_callers_share_the_configured_workers_and_get_their_own_results(method):
    import threading

    pickmap.shutdown()
    results: dict[int, object] = {}

    def caller(n: int) -> None:
        try:
            if n == 3:  # one item, so no busy worker is killed (which would start a replacement)
                pmap(zoo.fail_on, [0], [0], backend="stdlib", workers=2, start_method=method)
            for _ in range(5):
                got = pmap(
                    zoo.pid_and_square,
                    range(n * 100, n * 100 + 40),
                    backend="stdlib",
                    workers=2,
                    start_method=method,
                )
                assert [square for _, square in got] == [
                    i * i for i in range(n * 100, n * 100 + 40)
                ]
                results.setdefault(n, set()).update(pid for pid, _ in got)  # type: ignore[union-attr]
        except BaseException as exc:
            results[n] = exc

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert isinstance(results.pop(3), ValueError)  # its own error, and only its own
    pids = set().union(*results.values())
    assert len(results) == 3 and 1 <= len(pids) <= 2  # never more than workers=2 processes in total
    pickmap.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("workers", [1, 2])
def test_two_imaps_zipped_in_one_thread_both_finish(workers):
    # The first holds the shared pool's workers while it is paused at a yield;
    # the second must not wait for it forever.
    kw = {"backend": "stdlib", "workers": workers, "chunksize": 1, "start_method": "fork"}
    pairs = list(
        zip(imap(time.sleep, [0.001] * 30, **kw), imap(abs, range(-30, 0), **kw), strict=False)
    )
    assert [b for _, b in pairs] == list(range(30, 0, -1))


@pytest.mark.timeout(30)
def test_a_paused_imap_does_not_hold_up_a_call_in_another_thread():
    import threading

    kw = {"backend": "stdlib", "workers": 2, "chunksize": 1, "start_method": "fork"}
    paused = imap(abs, range(100), **kw)
    next(paused)  # it holds workers now, and its consumer goes away for a while
    done = threading.Event()
    got: list[int] = []
    thread = threading.Thread(
        target=lambda: (got.extend(pmap(abs, range(-20, 0), **kw)), done.set())
    )
    thread.start()
    assert done.wait(20), "the other thread's call waited for the paused imap"
    thread.join()
    assert got == list(range(20, 0, -1))
    paused.close()


def test_an_abandoned_imap_leaves_no_result_segment_behind():
    for _ in range(3):
        results = imap(
            bytearray, [300_000] * 20, backend="stdlib", workers=2, chunksize=1, start_method="fork"
        )
        next(results)
        time.sleep(0.2)  # let the workers write results that will never be read
        results.close()
    assert _segments() == set()
