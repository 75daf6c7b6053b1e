"""Multi-process engines, in one process: a follower engine replaying the turn log of a
leader engine must decode exactly what the leader decodes (the real two-process runs are
in test_multiprocess.py)."""

import threading

import pytest

from jaxinfer import engine_sync as sync
from jaxinfer.engine import Engine, EngineClosedError, EngineConfig, NotLeaderError
from jaxinfer.errors import DistributedError
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.structured import Constraint

from .engine_helpers import CharTokenizer, W
from .helpers import TINY


class FakeLog:
    """An in-memory stand-in for the coordination service's key-value store, one side."""

    def __init__(self, store: dict, cond: threading.Condition, leader: bool):
        self.store, self.cond, self.leader = store, cond, leader

    def publish(self, turn, events):
        with self.cond:
            self.store[turn] = sync.encode(events)  # through the wire format
            self.cond.notify_all()

    def read(self, turn, closing):
        with self.cond:
            self.cond.wait_for(lambda: turn in self.store)
            return sync.decode(self.store[turn])

    def forget(self, read_by_all):
        pass

    def publish_failure(self, error):
        self.publish(max(self.store, default=-1) + 1, [sync.Close(repr(error))])


@pytest.fixture
def pair(monkeypatch):
    """(leader, follower) engines over one in-memory turn log."""
    store, cond = {}, threading.Condition()
    logs = iter([FakeLog(store, cond, True), FakeLog(store, cond, False)])
    monkeypatch.setattr(sync, "connect", lambda: next(logs))
    config = EngineConfig(num_slots=4, max_len=256)
    leader, follower = (Engine(W, TINY, CharTokenizer(), config) for _ in range(2))
    yield leader, follower
    leader.close()
    follower.close()


def test_wire_format_round_trip():
    events = [sync.Submit(3, [1, 2, 3], SamplingParams(temperature=0.7, top_k=5, seed=2**64 - 1,
                                                       logprobs=2, logit_bias={4: -1.5},
                                                       stop_token_ids=[9, 7], min_tokens=2,
                                                       ignore_eos=True), 9, ("\n", "x"),
                          False, Constraint(choice=("a", "b c")).to_json(), adapter=2,
                          priority=-4),
              sync.Cancel(3), sync.Close(), sync.Close("boom")]
    assert sync.decode(sync.encode(events)) == events


def test_follower_replays_the_leader(pair):
    leader, follower = pair
    with pytest.raises(NotLeaderError):
        follower.submit("hi")
    assert follower.warmup() == 0
    reqs = [leader.submit("abc" * (i + 1), sampling=s, max_tokens=24, stop=stop)
            for i, (s, stop) in enumerate([
                (GREEDY, ()), (SamplingParams(temperature=1.0), ()),  # unseeded
                (SamplingParams(temperature=0.9, top_p=0.8, seed=5, logprobs=2), ()),
                (SamplingParams(temperature=1.0, repetition_penalty=1.3), ("e",)),
                (GREEDY, ()), (SamplingParams(temperature=2.0), ())])]  # 6 > 4 slots
    reqs.append(leader.submit("json", sampling=SamplingParams(temperature=1.0), max_tokens=30,
                              constraint=Constraint(regex=r"[a-z]{2,8}@[a-z]{2,5}\.com")))
    # EOS is not allowed before 300 letters: the cancel, not EOS, must end it.
    long = leader.submit("zz", sampling=SamplingParams(temperature=1.0), max_tokens=200,
                         constraint=Constraint(regex="[a-z]{300}"))
    next(iter(long))
    long.cancel()  # mid-decode: applied at the same turn on both
    results = [r.result(timeout=120) for r in reqs + [long]]
    assert results[-1].finish_reason == "cancelled"
    leader.close()  # publishes the shutdown
    follower.join()
    assert follower.requests_finished == leader.requests_finished == len(results)
    assert follower.token_digest == leader.token_digest


def test_follower_keeps_the_leaders_priority_order(monkeypatch):
    """Under the priority policy the follower queues and preempts as the leader does
    (the submit event carries the priority; preemption depends only on replayed state):
    the same finish order and tokens on both."""
    store, cond = {}, threading.Condition()
    logs = iter([FakeLog(store, cond, True), FakeLog(store, cond, False)])
    monkeypatch.setattr(sync, "connect", lambda: next(logs))
    config = EngineConfig(num_slots=1, max_len=256, scheduling_policy="priority")
    leader, follower = (Engine(W, TINY, CharTokenizer(), config) for _ in range(2))
    try:
        sp = SamplingParams(temperature=1.0, seed=3, ignore_eos=True)
        first = leader.submit("abc", sampling=sp, max_tokens=120, priority=9)
        next(iter(first))  # it holds the only slot until a request of priority < 9 comes
        reqs = [leader.submit("xy" * (i + 1), sampling=GREEDY, max_tokens=4, priority=p)
                for i, p in enumerate([2, 1, 0])]
        results = [r.result(timeout=120) for r in [first] + reqs]
        assert leader.preemptions >= 1 and results[0].metrics.preemptions >= 1
        leader.close()
        follower.join()
        assert follower.preemptions == leader.preemptions
        assert follower.token_digest == leader.token_digest
    finally:
        leader.close()
        follower.close()


def test_a_failed_leader_fails_the_follower(pair):
    leader, follower = pair
    leader._turns.publish_failure(RuntimeError("device lost"))
    with pytest.raises(EngineClosedError, match="device lost"):
        follower.join()
    assert isinstance(follower._fatal, DistributedError)


def test_follower_runs_each_request_with_its_adapter(monkeypatch):
    """With LoRA adapters, the follower decodes each request under the adapter the leader
    gave it (the submit event carries it): the same tokens, which the adapters change."""
    from jaxinfer.convert.lora import stack_adapters

    from .test_lora_stack import _random_adapter

    store, cond = {}, threading.Condition()
    logs = iter([FakeLog(store, cond, True), FakeLog(store, cond, False)])
    monkeypatch.setattr(sync, "connect", lambda: next(logs))
    stack = stack_adapters([_random_adapter(1, 4, ["q_proj", "down_proj"], 4.0),
                            _random_adapter(2, 2, ["v_proj", "up_proj"], 4.0)], W["embed"].dtype)
    config = EngineConfig(num_slots=2, max_len=256)
    leader, follower = (Engine(W, TINY, CharTokenizer(), config, lora=stack,
                               adapter_names=["a", "b"]) for _ in range(2))
    try:
        reqs = [leader.submit("abcabc", sampling=GREEDY, max_tokens=16, adapter=name)
                for name in (None, "a", "b", "a")]
        toks = [r.result(timeout=120).token_ids for r in reqs]
        assert toks[1] == toks[3] and len({tuple(t) for t in toks[:3]}) == 3
        leader.close()
        follower.join()
        assert follower.token_digest == leader.token_digest
    finally:
        leader.close()
        follower.close()
