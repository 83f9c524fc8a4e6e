"""Progress of long commands: rich bars on a terminal, plain log lines everywhere else.

One mechanism for every command that runs for minutes (study, benchmark build, matrix,
fit, eval). Library code reports through callbacks; `Stages` turns them into output.
Where the output goes depends on the CLI's stdout console:

- a terminal: rich bars on stderr, an overall bar once `plan` names the stages and one for
  the current stage; a finished stage leaves one line, `done <stage> in 1m20s`;
- anything else (CI, nohup, `> log`, a cluster job): plain lines on stdout, each flushed
  as it is printed, so a log fills while the job runs::

      start build private
      build private: 120/512 expert steps, 1m20s elapsed, ETA 4m10s
      done build private in 5m30s (512/512 expert steps)

  A progress line is printed at most every LORAFUSE_LOG_EVERY seconds (default 30; 0
  prints every update); the `done` line carries the final count.
"""

from __future__ import annotations

import os
import time

from rich.console import Console

from lorafuse.cli import common

EVERY_ENV = "LORAFUSE_LOG_EVERY"
EVERY_DEFAULT = 30.0
WIDTH = 40  # longest stage name a bar shows


def log_every() -> float:
    """Seconds between two progress lines of a log (LORAFUSE_LOG_EVERY, default 30).

    Raises LorafuseError when the variable is set to something else than seconds >= 0.
    """
    from lorafuse.errors import LorafuseError

    text = os.environ.get(EVERY_ENV, "").strip()
    if not text:
        return EVERY_DEFAULT
    try:
        every = float(text)
    except ValueError:
        every = -1.0
    if not every >= 0 or every == float("inf"):
        raise LorafuseError(f"{EVERY_ENV} must be a number of seconds >= 0; got {text!r}")
    return every


def duration(seconds: float) -> str:
    """'4.2s', '45s', '1m20s' or '2h05m'."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Stages:
    """Progress of a command made of stages; the study's `Progress` protocol and more.

    `console`: where to report (its being a terminal picks bars or lines); by default the
    CLI's stdout console decides, bars go to stderr and lines to stdout. Use as a context
    manager; `start` a stage, `advance`/`update`/`tick` within it, `finish` it.
    """

    def __init__(self, console: Console | None = None):
        self.terminal = (console or common.console).is_terminal
        self.out = console or (common.err_console if self.terminal else common.console)
        self.every = log_every()
        self.bar = None
        self.overall = self.task = None
        self.stage: str | None = None
        self.planned: list[str] = []
        self.done, self.total, self.unit = 0, None, ""
        self.started = self.counted_since = self.last_line = 0.0
        self.counted_from, self.parts = 0, False
        self.detail = ""  # the last step and loss of a fit

    def __enter__(self) -> Stages:
        if self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.bar = Progress(*columns, console=self.out)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:  # a stage left open ends with the command
            self.finish()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def plan(self, stages: list[str]) -> None:
        """The stages about to run, in order (an overall bar; `start (3/12)` in a log)."""
        self.planned = list(stages)
        if self.bar is not None:
            if self.overall is None:
                self.overall = self.bar.add_task("overall", total=len(stages))
            self.bar.update(self.overall, total=len(stages), completed=0)

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        """Stage `stage` begins: `total` units of `unit` (None: not known); a stage still
        open is finished first."""
        if self.stage is not None:
            self.finish()
        now = time.monotonic()
        self.stage, self.total, self.unit, self.done = stage, total, unit, 0
        self.started = self.counted_since = self.last_line = now
        self.counted_from, self.parts, self.detail = 0, False, ""
        if self.bar is not None:
            name = stage if len(stage) <= WIDTH else stage[: WIDTH - 1] + "…"
            self.task = self.bar.add_task(name, total=total)
        else:
            n = len(self.planned)
            where = f" ({self.planned.index(stage) + 1}/{n})" if stage in self.planned else ""
            self._line(f"start {stage}{where}")

    def advance(self, n: int = 1) -> None:
        """`n` more units of the current stage are done."""
        self.update(self.done + int(n), self.total)

    def tick(self, *args) -> None:
        """A fit's progress callback: tick(n) counts n units (rows of cached passes),
        tick(step, loss) one step, whose number and loss a log line shows."""
        if len(args) == 1:
            self.advance(int(args[0]))
        else:
            self.detail = f" (step {int(args[0])}, loss {float(args[1]):.4f})"
            self.advance(1)

    def update(self, done: int, total: int | None) -> None:
        """The current stage is at `done` of `total` (a new total restarts the ETA)."""
        if self.stage is None:
            return
        now = time.monotonic()
        if total != self.total or done < self.done:  # another part of the stage
            self.parts = self.parts or self.total is not None
            self.counted_since, self.counted_from = now, done
        moved = (done, total) != (self.done, self.total)
        self.done, self.total = done, total
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
        elif moved and now - self.last_line >= self.every:
            self._line(f"{self.stage}: {self._count()}{self.detail}, {self._times(now)}")

    def finish(self, stage: str | None = None, cached: bool = False) -> None:
        """The current stage ended (`cached`: its stored result was reused)."""
        if self.stage is None:
            return
        stage, seconds = self.stage, time.monotonic() - self.started
        self.stage = None
        counted = self.done and not self.parts  # one count for the whole stage
        note = " (cached)" if cached else f" ({self._count()})" if counted else ""
        if self.bar is not None:
            self.bar.remove_task(self.task)
            if self.overall is not None:
                self.bar.advance(self.overall, 1)
            line = common.styled("done", "dim", f"{stage} in {duration(seconds)}{note}")
            self.out.print(line, highlight=False, soft_wrap=True)
        else:
            self._line(f"done {stage} in {duration(seconds)}{note}")

    def kept(self, stage: str) -> None:
        """Stage `stage` was finished by an earlier run: one line, `kept <stage>`."""
        if self.stage is not None:
            self.finish()
        if self.bar is not None:
            if self.overall is not None:
                self.bar.advance(self.overall, 1)
            self.out.print(common.styled("kept", "dim", stage), highlight=False, soft_wrap=True)
        else:
            self._line(f"kept {stage}")

    def _count(self) -> str:
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        return f"{count} {self.unit or ('' if self.total else 'done')}".rstrip()

    def _times(self, now: float) -> str:
        text = f"{duration(now - self.started)} elapsed"
        made = self.done - self.counted_from
        if self.total and made > 0 and self.done < self.total:
            rate = made / max(now - self.counted_since, 1e-9)
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text

    def _line(self, text: str) -> None:
        self.last_line = time.monotonic()
        self.out.print(text, highlight=False, soft_wrap=True, markup=False)
