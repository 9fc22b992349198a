"""The device connection key in Redis: which connection of a device is the newest.

Every new connection SETs `keys.device_connection(device_id)` to its id, so the last SET
names the connection that wins, on whichever hub it is. Refreshing and releasing the key
compare its value inside a Lua script, so an older connection never extends or deletes
the key of a newer one. A missing key (expired, or lost with Redis) counts as free.
"""

import uuid

from redis.asyncio import Redis

from mensajero_common.keys import RedisKeys

# KEYS[1] = connection key, ARGV[1] = connection id, ARGV[2] = TTL in seconds.
_REFRESH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
end
return 0
"""

# KEYS[1] = connection key, ARGV[1] = connection id.
_RELEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""


class ConnectionKeys:
    def __init__(self, redis: Redis, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self.ttl_s = ttl_s
        self._refresh = redis.register_script(_REFRESH_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)

    async def claim(self, device_id: uuid.UUID, connection_id: str) -> None:
        """Make this connection the device's newest, whatever connection held the key."""
        await self._redis.set(
            self._keys.device_connection(device_id), connection_id, ex=self.ttl_s
        )

    async def refresh(self, device_id: uuid.UUID, connection_id: str) -> bool:
        """Extend the key's TTL; return False when the key names a newer connection."""
        result = await self._refresh(
            keys=[self._keys.device_connection(device_id)],
            args=[connection_id, self.ttl_s],
        )
        return bool(result)

    async def release(self, device_id: uuid.UUID, connection_id: str) -> bool:
        """Delete the key; return False, keeping it, when it names a newer connection."""
        result = await self._release(
            keys=[self._keys.device_connection(device_id)], args=[connection_id]
        )
        return bool(result)

    async def current(self, device_id: uuid.UUID) -> str | None:
        value = await self._redis.get(self._keys.device_connection(device_id))
        return None if value is None else value.decode()
