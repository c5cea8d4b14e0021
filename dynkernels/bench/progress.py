"""A small text progress bar on stderr (no dependency). On a terminal it redraws one line;
into a log file it writes a line every few percent instead of a stream of carriage returns."""
import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", width: int = 30, stream=None):
        self.total = max(1, total)
        self.label = label
        self.width = width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_logged = -1

    def advance(self, note: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {time.monotonic() - self.start:5.0f}s {note}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            step = int(frac * 20)  # every 5 %
            if step == self._last_logged and self.done != self.total:
                return
            self._last_logged = step
            self.stream.write(line + "\n")
        self.stream.flush()
