#!/usr/bin/env python3
"""Reads a relora run's TensorBoard event files with TensorBoard's own readers and checks them against the
run's metrics.jsonl. Run by hand (needs `pip install tensorboard`; not run by CI):

    python Tests/Fixtures/check_tensorboard.py runs/my-run [runs/other-run ...]

For each run directory it
  1. reads every `events.out.tfevents.*.relora` file record by record with TensorBoard's TFRecord reader
     (`PyRecordReader_New`, which checks the masked CRC32C of every length and payload and raises on a
     mismatch) and parses each record as `tensorboard.compat.proto.event_pb2.Event`;
  2. checks the first record of each file is `file_version: "brain.Event:2"`;
  3. loads the directory with `EventAccumulator` (what `tensorboard --logdir` uses, including its purge of
     a resumed run's stale steps on `SessionLog START`) and checks that every numeric value of every
     metrics.jsonl line is there, under its tag, at its step, equal to the line's value rounded to float32,
     and that there are no scalars beyond those.
Exits non-zero on the first run that fails.
"""
import glob, json, os, struct, sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

# metrics.jsonl key -> tag, as TensorBoardWriter.tags; keys in SKIP are not written; other numeric keys
# are written under their own name.
TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_second": "perf/tokens_per_second", "ms": "perf/step_ms", "memory_bytes": "perf/memory_bytes",
    "mfu": "perf/mfu",
    "val_loss": "val/loss", "val_perplexity": "val/perplexity",
    "relative_update": "restart/relative_update", "merge_error": "restart/merge_error",
    "zeroed_m": "restart/zeroed_m", "zeroed_v": "restart/zeroed_v", "merge_seconds": "restart/merge_seconds",
}
SKIP = {"step", "restart", "skipped", "val_tokens"}


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def read_records(path):
    reader = PyRecordReader_New(path)
    events = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return events
        event = event_pb2.Event()
        event.ParseFromString(reader.record())
        events.append(event)


def check_run(run):
    files = sorted(glob.glob(os.path.join(run, "events.out.tfevents.*.relora")))
    if not files:
        raise SystemExit(f"{run}: no event files")
    records = 0
    for path in files:
        events = read_records(path)  # raises DataLossError on a bad CRC
        if not events or events[0].file_version != "brain.Event:2":
            raise SystemExit(f"{path}: the first record is not file_version brain.Event:2")
        records += len(events)
        starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
        print(f"{os.path.basename(path)}: {len(events)} records, CRCs ok" + (f", SessionLog START at step {starts}" if starts else ""))

    expected = {}  # tag -> {step: value}
    lines = 0
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        for line in fh:
            if not line.strip():
                continue
            obj = json.loads(line)
            lines += 1
            for key, value in obj.items():
                if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                expected.setdefault(TAGS.get(key, key), {})[obj["step"]] = f32(value)

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    got_tags = set(acc.Tags()["scalars"])
    if got_tags != set(expected):
        raise SystemExit(f"{run}: tags differ: only in events {sorted(got_tags - set(expected))}, "
                         f"only in metrics {sorted(set(expected) - got_tags)}")
    compared = 0
    for tag, by_step in sorted(expected.items()):
        scalars = acc.Scalars(tag)
        got = {s.step: s.value for s in scalars}
        if len(got) != len(scalars):
            raise SystemExit(f"{run}: {tag} has a step twice")
        if got != by_step:
            bad = sorted(s for s in set(got) | set(by_step) if got.get(s) != by_step.get(s))[:5]
            raise SystemExit(f"{run}: {tag} differs at steps {bad}: events {[got.get(s) for s in bad]}, "
                             f"metrics {[by_step.get(s) for s in bad]}")
        if any(s.wall_time < 1.5e9 for s in scalars):
            raise SystemExit(f"{run}: {tag} has a wall_time before 2017")
        compared += len(scalars)
    steps = sorted({s for by_step in expected.values() for s in by_step})
    print(f"{run}: OK: {compared} scalars under {len(expected)} tags equal metrics.jsonl "
          f"({lines} lines, steps {steps[0]}..{steps[-1]}, {len(files)} event file(s), {records} records)")


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for run in sys.argv[1:]:
        check_run(run)


if __name__ == "__main__":
    main()
