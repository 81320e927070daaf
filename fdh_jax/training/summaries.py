"""Training logs of process 0: `metrics.jsonl` and TensorBoard scalars.

`metrics.jsonl` holds one JSON object per logged step (the file tests and scripts read);
`tensorboard/` holds the same scalars as TensorBoard event files (`tensorboard --logdir
WORKDIR/tensorboard`), written with TensorBoard's own TensorFlow-free event writer, plus the
final mAP of every code length under `eval/mAP_<K>`.
"""

import json
import time
from pathlib import Path

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from fdh_jax.common.atomic_files import write_text_atomically


def report(message: str) -> None:
    """Progress output, from process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


class MetricWriter:
    """Appends scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`.

    A resumed run (`resumed_at`: the restored step) appends to the same JSON lines file and
    starts a new event file. A run killed after logging steps it had not yet checkpointed logs
    them again after the restart, so each step appears once: the rows past `resumed_at` are
    dropped from `metrics.jsonl` (rewritten atomically), and the new event file starts with a
    `SessionLog.START` at step `resumed_at + 1`, TensorBoard's signal to discard the older
    events from that step on.
    """

    def __init__(self, workdir: Path, *, jsonl: bool = True, resumed_at: int | None = None):
        """`jsonl=False`: TensorBoard events only (evaluation results live in results.json)."""
        path = Path(workdir) / "metrics.jsonl"
        if jsonl and resumed_at is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resumed_at
            ]
            write_text_atomically(path, "".join(f"{line}\n" for line in kept))
        self._jsonl = open(path, "a") if jsonl else None  # noqa: SIM115
        self._events = EventFileWriter(str(Path(workdir) / "tensorboard"))
        if resumed_at is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=resumed_at + 1, session_log=start)
            )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Logs `scalars` at `step`."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self._jsonl.flush()
        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in scalars.items()
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        self._events.add_event(event)
        self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        self._events.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
