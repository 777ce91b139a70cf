"""Time the metadata state machine's apply of topic creates, as a replica runs it.

Six active brokers on three racks; then ``BATCHES`` entries, each a
``CreateTopics`` of 100 topics of 3 partitions and replication factor 3 (or,
with ``--single``, a ``CreateTopic`` of one such topic), applied through the
change feed (:class:`~streambus_consensus.metadata.feed.WatchedStateMachine`).
Prints the median apply time per entry, then the encode and decode times of
50 more entries; ``--prof [SORT]`` adds a cProfile of applying those 50.

Run: ``python tools/apply_bench.py [BATCHES] [--single] [--prof [SORT]]``.
Compare two versions interleaved (several runs each, alternating), on the
same machine, by their medians.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import uuid

from streambus_consensus.metadata import (
    BATCH_CREATE_VERSION,
    Command,
    CreateTopic,
    CreateTopics,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    TopicSpec,
    decode_command,
    encode_command,
)
from streambus_consensus.metadata.feed import WatchedStateMachine


def uid(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batches", type=int, nargs="?", default=200)
    parser.add_argument("--single", action="store_true",
                        help="one CreateTopic per entry instead of a CreateTopics of 100")
    parser.add_argument("--prof", nargs="?", const="tottime", metavar="SORT",
                        help="profile 50 applies, sorted by SORT (default tottime)")
    args = parser.parse_args(argv)

    w = WatchedStateMachine()
    seq = 0

    def rid() -> RequestId:
        nonlocal seq
        seq += 1
        return RequestId("b", seq)

    def apply(command: Command) -> None:
        result = w.apply(encode_command(command))
        assert result.ok, result

    for b in range(6):
        apply(RegisterBroker(request_id=rid(), broker_id=b, endpoint=f"h{b}:9092",
                             rack=f"r{b % 3}", incarnation_id=uid(b), fenced=False))
    apply(SetMetadataVersion(request_id=rid(), level=BATCH_CREATE_VERSION))

    n = 0

    def entry() -> bytes:
        nonlocal n
        if args.single:
            n += 1
            return encode_command(CreateTopic(
                request_id=rid(), name=f"t{n}", topic_id=uid(10**6 + n), partitions=3,
                replication_factor=3, config={}, placement_offset=n))
        specs = []
        for _ in range(100):
            n += 1
            specs.append(TopicSpec(name=f"t{n}", topic_id=uid(10**6 + n), partitions=3,
                                   replication_factor=3, config={}, placement_offset=n))
        return encode_command(CreateTopics(request_id=rid(), topics=tuple(specs)))

    what = "CreateTopic (1 topic)" if args.single else "100-topic batch"
    times = []
    for _ in range(args.batches):
        raw = entry()
        started = time.perf_counter()
        result = w.apply(raw)
        times.append(time.perf_counter() - started)
        assert result.ok, result
    print(f"apply per {what}: median {statistics.median(times) * 1e3:.3f} ms  "
          f"(n={len(times)}, topics now {n})")
    started = time.perf_counter()
    raws = [entry() for _ in range(50)]
    print(f"encode per entry: {(time.perf_counter() - started) / 50 * 1e3:.3f} ms")
    started = time.perf_counter()
    for raw in raws:
        decode_command(raw)
    print(f"decode per entry: {(time.perf_counter() - started) / 50 * 1e3:.3f} ms")
    if args.prof:
        profile = cProfile.Profile()
        profile.enable()
        for raw in raws:
            w.apply(raw)
        profile.disable()
        pstats.Stats(profile).sort_stats(args.prof).print_stats(30)


if __name__ == "__main__":
    main()
