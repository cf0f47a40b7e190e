"""What a person watching the trainer sees: a rich progress bar in a terminal, otherwise a
plain line every few steps (the supervisor keeps the stderr tail, so it must stay readable)."""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_SECONDS = 10.0


class Display:
    def __init__(
        self, enabled: bool, total_examples: int, start_examples: int = 0, quiet: bool = False
    ):
        self.enabled = enabled
        # A distributed job's other ranks: rank 0 speaks for the job, once per line.
        self.quiet = quiet
        self.total = total_examples
        self._last_plain = 0.0
        self._bar = None
        self._task = None
        if enabled:
            # rich only when there is a terminal to draw on: a supervised trainer saves the
            # import and its memory.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total_examples, completed=start_examples, stats=""
            )

    def __enter__(self) -> Display:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.stop()

    @staticmethod
    def stats(progress) -> str:
        loss = "-" if progress.loss is None else f"{progress.loss:.3f}"
        return (
            f"step {progress.step} loss {loss} {progress.tokens_per_sec:.0f} tok/s "
            f"mlx peak {progress.mlx_peak_mb:.0f} MB"
        )

    def update(self, progress) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task, completed=progress.examples_seen, stats=self.stats(progress)
            )
            return
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY_SECONDS or progress.examples_seen >= self.total:
            self._last_plain = now
            print(
                f"loractl: {progress.examples_seen}/{self.total} examples, {self.stats(progress)}",
                file=sys.stderr,
                flush=True,
            )

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif not self.quiet:
            print(f"loractl: {text}", file=sys.stderr, flush=True)
