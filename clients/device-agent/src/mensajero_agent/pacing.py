"""Pacing of the frames the agent sends, so that it stays under the hub's frame limit.

The hub admits DEVICE_FRAMES_PER_SECOND frames a second per connection, with bursts of
up to 5 seconds' worth, and closes the connection with code 4029 after a run of rejected
frames. The agent's bucket holds only 1 second's worth, so frames that the network
delays and then delivers together still fit in the hub's burst.

NOTE: this is a hand-written bucket rather than the `limits` package of the services.
The in-memory storage of `limits` 5.8 reads the wall clock, so setting the phone's clock
back would stop all sending for as long as the clock went back.
"""

# The hub's default DEVICE_FRAMES_PER_SECOND. The agent uses it when the hub's register
# ack has no `max_frames_per_s` (hubs from before that field) and no option sets a rate.
DEFAULT_FRAMES_PER_S = 20.0


class FramePacer:
    """Token bucket of the frames one connection sends: `rate_per_s` tokens flow in each
    second, up to 1 second's worth (at least 1 token), and each frame takes one.

    Times are monotonic seconds, such as the event loop's `time()`. The bucket starts
    full, like the hub's bucket of a new connection.
    """

    def __init__(self, rate_per_s: float, now_s: float) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be above 0, got {rate_per_s}")
        self._rate_per_s = rate_per_s
        self._tokens = self._capacity
        self._updated_at_s = now_s

    @property
    def rate_per_s(self) -> float:
        return self._rate_per_s

    @property
    def _capacity(self) -> float:
        return max(1.0, self._rate_per_s)

    def set_rate(self, rate_per_s: float, now_s: float) -> None:
        """Change the rate from now on; tokens gathered so far stay, up to the new capacity."""
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be above 0, got {rate_per_s}")
        self._refill(now_s)
        self._rate_per_s = rate_per_s
        self._tokens = min(self._tokens, self._capacity)

    def pause_until(self, until_s: float, now_s: float) -> None:
        """Let no frame out before `until_s`, and hold at most one token then.

        Tokens stop flowing in until `until_s`: after a `rate_limited` error the hub's
        own bucket holds only what flowed in during the pause, so a burst right after it
        would be rejected again.
        """
        self._refill(now_s)
        self._tokens = min(self._tokens, 1.0)
        self._updated_at_s = max(self._updated_at_s, until_s)

    def delay_s(self, now_s: float) -> float:
        """Return the seconds until a frame may be sent: 0 when a token is there now."""
        self._refill(now_s)
        paused_s = max(0.0, self._updated_at_s - now_s)
        if self._tokens >= 1:
            return paused_s
        return paused_s + (1 - self._tokens) / self._rate_per_s

    def take(self, now_s: float) -> None:
        """Take the token of a frame being sent; call it only when `delay_s` returns 0."""
        self._refill(now_s)
        self._tokens -= 1

    def _refill(self, now_s: float) -> None:
        # `_updated_at_s` lies ahead of `now_s` during a pause.
        if now_s <= self._updated_at_s:
            return
        elapsed_s = now_s - self._updated_at_s
        self._tokens = min(self._capacity, self._tokens + elapsed_s * self._rate_per_s)
        self._updated_at_s = now_s


def frame_rate_per_s(announced: object, configured: float | None) -> float:
    """Return the maximum frames per second to send on a connection.

    `announced` is the register ack's `max_frames_per_s`. `configured` (the
    --max-frames-per-s option) caps it, and applies alone when the hub announces no
    valid rate. Without either, the rate is DEFAULT_FRAMES_PER_S.
    """
    if (
        isinstance(announced, bool)
        or not isinstance(announced, int | float)
        or announced <= 0
    ):
        return configured if configured is not None else DEFAULT_FRAMES_PER_S
    rate = float(announced)
    return rate if configured is None else min(rate, configured)
