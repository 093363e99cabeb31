"""Everything that talks to Redis: client factory, server facts, server-side scripts."""

from migrator.redisio.client import connect
from migrator.redisio.scripts import Scripts
from migrator.redisio.server import ServerInfo, server_info, supports_unlink

__all__ = ["Scripts", "ServerInfo", "connect", "supports_unlink", "server_info"]
