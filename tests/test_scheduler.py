"""The scheduler on a simulated GPU: segments with known durations, a virtual clock, exact timings."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from runtime.scheduler import INF, Rejected, Scheduler, Task


@dataclass
class Seg:
    name: str
    duration_ms: float | None  # what the scheduler believes (measured at load; None: unknown)
    actual_ms: float | None = None  # what the simulated GPU takes (default: the same)
    runs: int = 0

    def launch(self, stream=None):
        self.runs += 1


class SimDevice:
    """A GPU that runs launched segments one after another; time moves only when someone waits."""

    def __init__(self):
        self.t = 0.0
        self.free_at = 0.0

    def now(self):
        return self.t

    def launch(self, seg, realtime):
        seg.launch()
        start = max(self.t, self.free_at)
        self.free_at = start + (seg.actual_ms if seg.actual_ms is not None else seg.duration_ms) / 1e3
        return self.free_at

    def done(self, token):
        return token <= self.t

    def wait(self, token):
        self.t = max(self.t, token)

    def idle(self, seconds):
        self.t += seconds


def task(model, n, ms, deadline=INF, release=0.0, priority=0, done=None, actual=None):
    return Task(model, [Seg(f"{model}{i}", ms, actual) for i in range(n)], deadline=deadline, priority=priority,
                release=release, on_done=done)


def simulate(s: Scheduler, dev: SimDevice, arrivals: list, until: float) -> None:
    """Submit each (time, task) when the clock reaches it; run the scheduler until `until`."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    while dev.t < until:
        while arrivals and arrivals[0][0] <= dev.t:
            s.submit(arrivals.pop(0)[1])
        if not s.step():
            nxt = min([arrivals[0][0]] if arrivals else [until])
            dev.t = min(max(nxt, dev.t + 1e-6), s.next_wakeup()) if s.next_wakeup() > dev.t else dev.t + 1e-6


def finish_order(tasks):
    return [t.model for t in sorted(tasks, key=lambda t: t.finished)]


def test_edf_order():
    dev = SimDevice()
    s = Scheduler(dev)
    tasks = [task("late", 3, 1, deadline=0.100), task("early", 3, 1, deadline=0.020), task("mid", 3, 1, deadline=0.050)]
    simulate(s, dev, [(0, t) for t in tasks], 0.05)
    assert finish_order(tasks) == ["early", "mid", "late"]
    assert all(t.finished is not None for t in tasks) and s.tally["early"].misses == 0


def test_priority_beats_deadline():
    dev = SimDevice()
    s = Scheduler(dev)
    low = task("low", 2, 1, deadline=0.010, priority=0)
    high = task("high", 2, 1, deadline=0.050, priority=1)
    simulate(s, dev, [(0, low), (0, high)], 0.02)
    assert finish_order([low, high]) == ["high", "low"]


def test_realtime_request_cuts_in_between_segments():
    """A long best-effort inference is running; a real-time request waits only for what is on the GPU."""
    for mode, expect_miss in (("edf", False), ("fifo", True)):
        dev = SimDevice()
        s = Scheduler(dev, depth=2, mode=mode)
        be = task("be", 10, 2.0)  # 20 ms of work
        rt = task("rt", 3, 1.0, deadline=0.005 + 0.010, release=0.005)
        simulate(s, dev, [(0, be), (0.005, rt)], 0.05)
        assert (s.tally["rt"].misses == 1) == expect_miss, mode
        if mode == "edf":
            # waited for at most the two segments in flight (2 x 2 ms), then ran its 3 ms
            assert rt.finished - 0.005 <= 0.004 + 0.003 + 1e-9
            assert be.finished > rt.finished and s.tally["be"].completed == 1
        else:
            assert rt.finished >= be.finished  # arrival order: behind the whole inference


def test_admission_control_rejects_what_cannot_be_on_time():
    dev = SimDevice()
    s = Scheduler(dev)
    errors = {}

    def done(t, err):
        errors[t.model] = err

    hopeless = task("hopeless", 5, 2.0, deadline=0.005, done=done)  # needs 10 ms, has 5
    first = task("first", 4, 2.0, deadline=0.010, done=done)
    second = task("second", 4, 2.0, deadline=0.012, done=done)  # after `first` it would end at 16 ms
    simulate(s, dev, [(0, hopeless), (0, first), (0, second)], 0.05)
    assert isinstance(errors["hopeless"], Rejected) and "estimated 10.0 ms from release, deadline 5.0 ms" in str(errors["hopeless"])
    assert errors["first"] is None and isinstance(errors["second"], Rejected)
    assert s.tally["hopeless"].rejected == 1 and s.tally["second"].rejected == 1
    assert all(seg.runs == 0 for seg in hopeless.segments + second.segments)  # never touched the GPU
    assert first.finished <= first.deadline


def test_periodic_releases_on_the_newest_observation():
    dev = SimDevice()
    s = Scheduler(dev)
    seen = []

    def make(obs, release):
        seen.append((obs, release))
        return task("cam", 3, 1.0, deadline=release + 0.008)

    s.add_periodic("cam", 0.010, make)
    simulate(s, dev, [], 0.0045)
    s.publish("cam", "obs-1")
    s.publish("cam", "obs-2")  # only the newest is kept
    simulate(s, dev, [], 0.1045)
    releases = [r for _, r in seen]
    assert [o for o, _ in seen][0] == "obs-2"
    assert releases == pytest.approx([0.01 * k for k in range(1, 11)])
    t = s.tally["cam"]
    assert t.completed == 10 and t.misses == 0
    assert max(t.latencies) == pytest.approx(0.003)


def test_periodic_overrun_is_skipped_and_counted():
    dev = SimDevice()
    s = Scheduler(dev)
    s.add_periodic("slow", 0.010, lambda obs, r: task("slow", 5, 3.0))  # 15 ms of work every 10 ms
    s.publish("slow", "x")
    simulate(s, dev, [], 0.1005)
    t = s.tally["slow"]
    assert t.skipped >= 4 and t.misses == t.skipped and t.completed >= 4


def test_miss_and_tardiness_when_durations_were_underestimated():
    dev = SimDevice()
    s = Scheduler(dev)
    late = task("late", 2, 1.0, deadline=0.005, actual=4.0)  # believed 2 ms, takes 8 ms
    simulate(s, dev, [(0, late)], 0.02)
    t = s.tally["late"]
    assert t.completed == 1 and t.misses == 1 and t.tardiness == [pytest.approx(0.003)]


def test_mixed_load_keeps_the_realtime_model_on_time():
    """The shape of the GPU benchmark: a 20 Hz real-time policy, a 10 Hz model, a best-effort loop."""
    results = {}
    for mode in ("fifo", "edf"):
        dev = SimDevice()
        s = Scheduler(dev, mode=mode)
        s.add_periodic("rt", 0.050, lambda o, r: task("rt", 12, 1.5, deadline=r + 0.030, priority=1))
        s.add_periodic("mid", 0.100, lambda o, r: task("mid", 12, 2.0, deadline=r + 0.100))
        s.publish("rt", 1)
        s.publish("mid", 1)
        be_done = []

        def again(t, err):
            be_done.append(t.finished)
            s.submit(task("be", 12, 2.0, done=again))

        s.submit(task("be", 12, 2.0, done=again))
        simulate(s, dev, [], 2.0)
        results[mode] = (s.tally["rt"].misses, len(be_done), s.tally["rt"].as_dict()["latency_ms"]["p99"])
    assert results["fifo"][0] > 0 and results["edf"][0] == 0
    assert results["edf"][2] <= 1.5 * 18.0  # within 1.5x of its 18 ms solo time
    assert results["edf"][1] >= 0.7 * results["fifo"][1]


def test_cancel_pending_fails_what_did_not_run():
    dev = SimDevice()
    s = Scheduler(dev)
    seen = []
    a = task("a", 3, 1.0, done=lambda t, e: seen.append((t.model, type(e).__name__ if e else None)))
    b = task("b", 3, 1.0, done=lambda t, e: seen.append((t.model, type(e).__name__ if e else None)))
    s.submit(a)
    s.submit(b)
    s.step()  # admits both, launches a's first segment
    assert s.cancel_pending() == 2 and sorted(seen) == [("a", "Cancelled"), ("b", "Cancelled")]
    assert not s.ready and s.step() is True  # the launched segment still completes


def test_after_a_stall_only_the_newest_overdue_release_runs():
    """A scheduler thread held up for several periods releases once, at the newest release time (the
    only one that can still be on time); the ones it slept through are skipped and counted."""
    dev = SimDevice()
    s = Scheduler(dev)
    seen = []

    def make(obs, release):
        seen.append(release)
        return task("cam", 2, 1.0, deadline=release + 0.008)

    s.add_periodic("cam", 0.010, make)
    s.publish("cam", "obs")
    dev.t = 0.0455  # releases at 10, 20, 30 and 40 ms are all due at once
    s.step()
    assert seen == [pytest.approx(0.040)]
    assert (s.tally["cam"].skipped, s.tally["cam"].misses) == (3, 3)
    simulate(s, dev, [], 0.06)
    assert s.tally["cam"].completed == 2 and s.tally["cam"].misses == 3  # 40 ms and 50 ms ran on time


def test_make_task_returning_none_or_raising_skips_the_release():
    dev = SimDevice()
    s = Scheduler(dev)
    calls = []

    def make(obs, release):
        calls.append(obs)
        if obs == "bad":
            return None
        if obs == "bug":
            raise RuntimeError("a bug in make_task")
        return task("cam", 1, 1.0)

    s.add_periodic("cam", 0.010, make)
    for i, obs in enumerate(("bad", "bug", "good")):
        s.publish("cam", obs)
        simulate(s, dev, [], 0.0105 + 0.010 * i)  # just past release i + 1
    assert calls == ["bad", "bug", "good"]
    t = s.tally["cam"]
    assert (t.skipped, t.misses, t.completed) == (2, 2, 1)  # and the scheduler went on


def test_swap_keeps_phase_and_newest_observation_remove_stops_releases():
    dev = SimDevice()
    s = Scheduler(dev)
    old, new = [], []
    s.add_periodic("cam", 0.010, lambda o, r: old.append((o, r)) or task("cam", 1, 1.0))
    s.publish("cam", "obs")
    simulate(s, dev, [], 0.025)
    s.add_periodic("cam", 0.010, lambda o, r: new.append((o, r)) or task("cam", 1, 1.0))  # the same period
    simulate(s, dev, [], 0.045)
    assert [r for _, r in old] == pytest.approx([0.01, 0.02])
    assert new == [("obs", pytest.approx(0.03)), ("obs", pytest.approx(0.04))]  # no gap, no re-publish needed
    assert s.release_index("cam", new[-1][1]) == 4
    s.remove_periodic("cam")
    simulate(s, dev, [], 0.08)
    assert len(new) == 2 and s.release_index("cam", 0.05) == -1


class ThreadSeg(Seg):
    """Remembers the thread that launched it."""

    def launch(self, stream=None):
        super().launch()
        self.thread = threading.current_thread()


def run_scheduler(s: Scheduler):
    stop = threading.Event()
    thread = threading.Thread(target=s.run, args=(stop, 5.0))  # a long poll: only a wake-up can be quick
    thread.start()
    time.sleep(0.05)  # idle, sleeping on its event
    return stop, thread


def stop_scheduler(s: Scheduler, stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    s.wake()
    thread.join(2.0)
    assert not thread.is_alive()


def test_submissions_and_calls_wake_the_idle_scheduler_thread():
    from runtime.scheduler import SyncDevice

    s = Scheduler(SyncDevice())
    stop, thread = run_scheduler(s)
    try:
        ran, done = [], threading.Event()
        t0 = time.perf_counter()
        s.call_soon(lambda: ran.append("call"))
        seg = ThreadSeg("m0", None)  # unknown duration: never launched by the submitting thread
        s.submit(Task("m", [seg], deadline=INF, on_done=lambda t, e: done.set()))
        assert done.wait(1.0) and time.perf_counter() - t0 < 0.5
        assert ran == ["call"] and seg.thread is thread and seg.runs == 1
    finally:
        stop_scheduler(s, stop, thread)


def test_an_idle_scheduler_lets_the_submitter_launch_short_segments_itself():
    """Saves a thread wake-up per request: a segment short enough for the synchronous device runs on
    the submitting thread, which also gets on_done; a longer one is left to the scheduler thread."""
    from runtime.scheduler import SyncDevice

    s = Scheduler(SyncDevice())
    stop, thread = run_scheduler(s)
    try:
        finished: list = []
        short = [ThreadSeg("s0", 0.05), ThreadSeg("s1", 0.05)]
        s.submit(Task("m", short, deadline=INF, on_done=lambda t, e: finished.append(threading.current_thread())))
        me = threading.current_thread()
        assert [seg.thread for seg in short] == [me, me] and finished == [me]  # done before submit returned
        long, done = ThreadSeg("l0", 5.0), threading.Event()
        s.submit(Task("m", [long], deadline=INF, on_done=lambda t, e: done.set()))
        assert done.wait(1.0) and long.thread is thread
        assert s.tally["m"].completed == 2
    finally:
        stop_scheduler(s, stop, thread)


def test_tally_keeps_a_bounded_window():
    dev = SimDevice()
    s = Scheduler(dev, window=10)
    for i in range(50):
        s.submit(task("m", 1, 0.1))
        simulate(s, dev, [], dev.t + 0.001)
    t = s.tally["m"]
    assert t.completed == 50 and 10 <= len(t.latencies) <= 20
    assert t.as_dict()["latency_ms"]["n"] == len(t.latencies)


def test_a_whole_inference_policy_learns_its_duration_and_then_runs_inline():
    """A loader's policy with only `infer` is one segment of unknown duration: the scheduler thread
    runs it at first; once a run has timed it, a short one runs on the submitting thread."""
    from runtime.executor import WholePolicy
    from runtime.scheduler import SyncDevice

    class Instant:
        def infer(self, obs):
            return {"actions": threading.current_thread()}

    whole = WholePolicy(Instant())
    s = Scheduler(SyncDevice())
    stop, thread = run_scheduler(s)
    try:
        jobs = []
        for _ in range(2):
            job, done = whole.prepare({}), threading.Event()
            s.submit(Task("m", list(job.segments), deadline=INF, on_done=lambda t, e, d=done: d.set()))
            assert done.wait(1.0)
            jobs.append(job)
        assert jobs[0].result()["actions"] is thread  # unknown duration: the scheduler thread ran it
        assert whole.duration_ms is not None and whole.duration_ms < SyncDevice.inline_ms
        assert jobs[1].result()["actions"] is threading.current_thread()  # known and short: run here
    finally:
        stop_scheduler(s, stop, thread)
