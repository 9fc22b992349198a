"""Every Redis stream, consumer group, channel and key name, in one place.

All names start with `REDIS_KEY_PREFIX`, so that test runs and several installs can share
one Redis server without touching each other's data.
"""

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    @property
    def new_messages_stream(self) -> str:
        """Stream of messages ready for assignment; entries carry `message_id`."""
        return f"{self.prefix}:stream:messages:new"

    @property
    def dispatcher_group(self) -> str:
        return "dispatcher"

    @property
    def device_events_stream(self) -> str:
        """Stream of device presence changes (`device_id`, `event`), read by the dispatcher."""
        return f"{self.prefix}:stream:devices:events"

    @property
    def webhook_events_stream(self) -> str:
        """Stream of webhook events to deliver, read by the webhook-sender."""
        return f"{self.prefix}:stream:webhooks:events"

    @property
    def webhook_group(self) -> str:
        return "webhook-sender"

    @property
    def arq_queue(self) -> str:
        return f"{self.prefix}:arq:queue"

    @property
    def rate_limit_prefix(self) -> str:
        """Prefix of the counters of the API's rate limits (in the layout of `limits`)."""
        return f"{self.prefix}:ratelimit"

    @property
    def login_throttle_prefix(self) -> str:
        """Prefix of the counters of failed logins, per account and per client address."""
        return f"{self.prefix}:loginthrottle"

    @property
    def device_auth_throttle_prefix(self) -> str:
        """Prefix of the counters of failed device authentications per client address."""
        return f"{self.prefix}:deviceauththrottle"

    @property
    def device_pace_prefix(self) -> str:
        """Prefix of the counters of tasks handed to each device (DEVICE_SMS_PER_MINUTE)."""
        return f"{self.prefix}:devicepace"

    @property
    def recovery_sweep_progress(self) -> str:
        """Position of the dispatcher's recovery sweep in its pass over the stale messages."""
        return f"{self.prefix}:recovery:progress"

    def periodic_job_lock(self, job_name: str) -> str:
        """Lock that lets one replica, not every one, run a periodic job in an interval."""
        return f"{self.prefix}:lock:job:{job_name}"

    def device_tasks_stream(self, device_id: uuid.UUID | str) -> str:
        """Stream of tasks for one device that it has not yet finished reporting on."""
        return f"{self.prefix}:stream:device:{device_id}:tasks"

    def device_channel(self, device_id: uuid.UUID | str) -> str:
        """Pub/sub channel that wakes, replaces, revokes or disables the hub connection of one
        device."""
        return f"{self.prefix}:channel:device:{device_id}"

    def device_connection(self, device_id: uuid.UUID | str) -> str:
        """Id of the newest hub connection of a device, with a TTL of the heartbeat timeout."""
        return f"{self.prefix}:device:{device_id}:connection"


# Control messages published on a device channel.
CHANNEL_WAKE = "wake"
# The device's key was rotated or the device deleted: the hub closes with 4003.
CHANNEL_REVOKE = "revoke"
# The device was disabled: the hub closes with 4001 and reason `device_inactive`. The
# key stays valid, so it connects again once the device is enabled.
CHANNEL_DISABLE = "disable"
# "connected:<connection id>": a newer connection of the device opened somewhere.
CHANNEL_CONNECTED_PREFIX = "connected:"
# "task <previous id> <stream id> <message id> <task JSON>": a task appended to the
# device's stream, carried so that the hub need not read the stream. <previous id> is
# the id of the entry that was last in the stream before it, or "-" when it was empty.
CHANNEL_TASK_PREFIX = "task "
