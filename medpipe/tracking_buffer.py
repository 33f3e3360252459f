"""Tracking that can never stop a training: every call to the store goes through
`BufferedTracker`, which, when the store fails (a server down at the start or dying
mid-run, a locked database), says so once, keeps every call it could not make in a journal
beside the run (`RUN/tracking_pending.jsonl`, one JSON object per line), and sends the
journal, in order, the next time the store answers: at a later call (at most one attempt
per `retry_seconds`), when the same run folder is tracked again (a resumed training, its
evaluation), or with `medpipe sync-tracking RUN`.

Nothing here imports MLflow: the wrapped tracker is opened by a function the caller gives
(`tracking.open_tracker`'s), so the buffer also serves any other `Tracker`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medpipe.runs.folder import RunFolder

PENDING_MODEL = "pending-model-"  # stands for a logged model's id until it is really logged


class BufferedTracker:
    """A `Tracker` whose calls succeed whatever the store does."""

    def __init__(self, open_store: Callable[[], Any], folder: RunFolder,
                 retry_seconds: float = 60.0, report: Callable[[str], None] | None = None,
                 ) -> None:
        self._open_store = open_store
        self.journal = folder.tracking_journal
        self.retry_seconds = retry_seconds
        self._report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self._store = None
        self._last_failure = -float("inf")
        self._reported = False
        self._models: dict[str, str] = {}  # pending id -> the id the store gave
        self.resumed = False
        self._connect()
        if self._store is not None:
            self.resumed = bool(getattr(self._store, "resumed", False))
            self.flush()

    # ------------------------------------------------------------------ the interface

    @property
    def run_id(self) -> str | None:
        return getattr(self._store, "run_id", None)

    @property
    def pending(self) -> int:
        """Calls waiting in the journal."""
        if not self.journal.is_file():
            return 0
        return sum(1 for line in self.journal.read_text(encoding="utf-8").splitlines()
                   if line.strip())

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", {"params": dict(params)})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._call("log_metrics", {"metrics": {k: float(v) for k, v in metrics.items()
                                               if v is not None}, "step": step})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._call("log_artifact", {"path": str(Path(path).resolve()), "folder": folder})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set_tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", {"status": status})

    def log_model(self, folder: RunFolder, task: str) -> str | None:
        """The logged model's id; while the store is away, a stand-in that later calls
        (tags, registration) may carry and that the replay swaps for the real id."""
        pending = f"{PENDING_MODEL}{time.time_ns()}"
        result = self._call("log_model", {"folder": str(folder.path.resolve()), "task": task,
                                          "pending_id": pending})
        return result if result is not None else pending

    def register_model(self, model_id: str, name: str, alias: str) -> int | None:
        return self._call("register_model", {"model_id": model_id, "name": name,
                                             "alias": alias})

    def flush(self) -> bool:
        """Send the journal to the store, in order; True when nothing is left waiting."""
        if not self.journal.is_file():
            return True
        if self._store is None and not self._connect():
            return False
        entries = [json.loads(line) for line in
                   self.journal.read_text(encoding="utf-8").splitlines() if line.strip()]
        for done, entry in enumerate(entries):
            try:
                self._send(entry["op"], entry["args"])
            except Exception as error:  # the store failed again: keep what is left
                self._failed(error)
                self._rewrite(entries[done:])
                return False
        self.journal.unlink(missing_ok=True)
        if self._reported:
            self._report(f"tracking: the store answers again; {len(entries)} waiting "
                         "call(s) sent")
        return True

    # ------------------------------------------------------------------ inside

    def _connect(self) -> bool:
        try:
            self._store = self._open_store()
            return True
        except Exception as error:
            self._failed(error)
            return False

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        due = time.monotonic() - self._last_failure >= self.retry_seconds
        if (self.journal.is_file() or self._store is None) and due:
            self.flush()
        if self._store is not None and not self.journal.is_file():
            try:
                return self._send(op, args)
            except Exception as error:
                self._failed(error)
        self._append(op, args)
        return None

    def _send(self, op: str, args: dict[str, Any]) -> Any:
        args = {k: self._models.get(v, v) if isinstance(v, str) else v
                for k, v in args.items()}
        if op == "set_tags":
            args["tags"] = {k: self._models.get(v, v) for k, v in args["tags"].items()}
        if op == "log_model":
            pending = args.pop("pending_id")
            model_id = self._store.log_model(RunFolder(Path(args["folder"])), args["task"])
            self._models[pending] = model_id
            return model_id
        return getattr(self._store, op)(**args)

    def _failed(self, error: BaseException) -> None:
        self._last_failure = time.monotonic()
        if not self._reported:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else \
                type(error).__name__
            self._report(f"tracking: the store failed ({reason}); the work goes on, and "
                         f"what could not be logged waits in {self.journal} until the store "
                         "answers again (or `medpipe sync-tracking "
                         f"{self.journal.parent}`)")
            self._reported = True

    def _append(self, op: str, args: dict[str, Any]) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps({"op": op, "args": args}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        staging = self.journal.with_name(self.journal.name + ".tmp")
        staging.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        os.replace(staging, self.journal)
