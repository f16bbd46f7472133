"""What the simulator's two job-stream edges share (``ConsumerJob``,
``ProviderJob``): the session's timer, armed at its ``next_deadline()``
and fired only if it is still the one armed, and a trace line whenever
the session changes state or acts."""

from __future__ import annotations

from typing import Any

from p2pgpu.core.jobs import Send


class SessionEdge:
    """Base of an edge driving one sans-IO job session in simulated time.

    A subclass sets ``role`` ("consumer" or "provider"), ``node``,
    ``session`` and ``done``, and implements ``apply(actions)``, which calls
    ``_trace`` first (when tracing) and ``_arm`` last (unless done).
    """

    role = ""
    node: Any
    session: Any
    done: bool

    def __init__(self) -> None:
        self._armed: int | None = None
        self._traced_state: str | None = None  # for traces only

    def apply(self, actions: list) -> None:
        raise NotImplementedError

    def _arm(self) -> None:
        deadline = self.session.next_deadline()
        if deadline is not None and deadline != self._armed:
            self._armed = deadline
            self.node.later_at(deadline, self._timer, deadline)

    def _timer(self, deadline: int) -> None:
        if self.done or self._armed != deadline:
            return
        self._armed = None
        self.apply(self.session.on_timer(self.node.now()))

    def _trace(self, actions: list) -> None:
        state = self.session.state.value
        names = [type(a).__name__ for a in actions if not isinstance(a, Send)]
        sends = sum(isinstance(a, Send) for a in actions)
        if state != self._traced_state or names:
            self._traced_state = state
            self.node.trace(f"{self.role} session "
                            f"{self.session.job_id.hex()[:8]}: {state}" + (f", {', '.join(names)}" if names else "")
                            + (f", sends {sends} frame(s)" if sends else ""))
