"""Progress off a terminal: plain lines at intervals, never carriage-return redraws."""
import io

from ivpt.progress import PlainProgress, progress


class FakeClock:
    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_plain_lines_at_intervals_and_tenths():
    out = io.StringIO()
    bar = PlainProgress(range(100), desc="epoch 1/2", stream=out, interval=30.0, clock=FakeClock(1.0))
    items = []
    for i in bar:
        items.append(i)
        bar.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert items == list(range(100)) and "\r" not in out.getvalue()
    # every tenth once 10 s have passed, every 30 s, and the end: far fewer lines than steps
    assert 5 <= len(lines) <= 14 and lines[-1].startswith("epoch 1/2: 100/100 (100%)") and "loss=0.5" in lines[-1]


def test_short_loops_stay_silent_and_terminals_get_tqdm():
    out = io.StringIO()
    list(PlainProgress(range(50), desc="eval", stream=out, interval=30.0, clock=FakeClock(0.01)))
    assert out.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = progress(range(3), desc="t", stream=term)
    assert type(bar).__name__ == "tqdm" and list(bar) == [0, 1, 2]
    assert isinstance(progress(range(3), desc="f", stream=io.StringIO()), PlainProgress)
