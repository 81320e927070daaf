"""Training logs of process 0: `metrics.jsonl` and TensorBoard scalars.

`metrics.jsonl` holds one JSON object per logged step (the file tests and scripts read);
`tensorboard/` holds the same scalars as TensorBoard event files (`tensorboard --logdir
WORKDIR/tensorboard`), written with TensorBoard's own TensorFlow-free event writer, plus the
final mAP of every code length under `eval/mAP_<K>`.
"""

import json
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
    """Appends scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`.

    A resumed run appends to the same JSON lines file and starts a new event file; TensorBoard
    merges the event files of a directory by step.
    """

    def __init__(self, workdir: Path, *, jsonl: bool = True):
        """`jsonl=False`: TensorBoard events only (evaluation results live in results.json)."""
        self._jsonl = open(Path(workdir) / "metrics.jsonl", "a") if jsonl else None  # noqa: SIM115
        self._events = EventFileWriter(str(Path(workdir) / "tensorboard"))

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
