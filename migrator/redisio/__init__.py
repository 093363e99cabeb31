"""Everything that talks to Redis: client factory, server facts, server-side scripts."""

from migrator.redisio.client import connect
from migrator.redisio.scripts import Scripts
from migrator.redisio.server import ServerInfo, keys_exist, server_info, supports_unlink

__all__ = ["Scripts", "ServerInfo", "connect", "keys_exist", "supports_unlink", "server_info"]
