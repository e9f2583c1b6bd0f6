"""The live lines of a fleet rollout, drawn as a pure function of their state."""

from __future__ import annotations

import io

from rebuild.progress import CLEAR_LINE, HostLine, Progress, render, up


class TestRender:
    def test_phase_time_countdown_and_last_line(self) -> None:
        """Each host: its phase, the seconds spent in it, a countdown for a wait, the last
        line it printed; names aligned; a finished host shows its result."""
        hosts = {
            "app1": HostLine(phase="verifying", since=100.0, deadline=160.0, last="unit ok"),
            "db10": HostLine(phase="nixos-rebuild", since=90.0, last="building '/nix/store/x'"),
            "web": HostLine(done="ok (exit 0)"),
        }
        assert render(hosts, now=112.4) == [
            "[app1] verifying 12s (48s left) | unit ok",
            "[db10] nixos-rebuild 22s | building '/nix/store/x'",
            "[web]  ok (exit 0)",
        ]

    def test_a_long_line_is_cut(self) -> None:
        """A live line never wraps (the redraw would go wrong): cut to the width."""
        hosts = {"a": HostLine(phase="p", since=0.0, last="x" * 500)}
        assert len(render(hosts, now=1.0, width=80)[0]) == 80

    def test_a_passed_deadline_shows_zero(self) -> None:
        hosts = {"a": HostLine(phase="rebooting", since=0.0, deadline=10.0)}
        assert render(hosts, now=30.0) == ["[a] rebooting 30s (0s left)"]


class TestDraw:
    def test_redraw_in_place(self) -> None:
        """The second drawing moves the cursor up over the first and clears each line."""
        out = io.StringIO()
        clock = iter([0.0, 1.0, 2.0, 3.0, 4.0]).__next__
        live = Progress(out, ["a", "b"], clock=clock)
        live.phase("a", "nixos-rebuild")
        live.draw()
        first = out.getvalue()
        assert first.count(CLEAR_LINE) == 2 and up(2) not in first
        live.finish("b", "ok (exit 0)")
        live.draw()
        second = out.getvalue()[len(first) :]
        assert second.startswith(up(2)) and "[b] ok (exit 0)" in second

    def test_a_phase_is_drawn_as_it_starts(self) -> None:
        """Once drawing has started, a new phase is drawn at once, not at the next refresh:
        a phase shorter than the refresh still shows."""
        out = io.StringIO()
        live = Progress(out, ["a"], clock=lambda: 0.0)
        live.start()
        try:
            live.phase("a", "verifying")
            assert "[a] verifying 0s" in out.getvalue()
        finally:
            live.stop()
