"""Lua scripts the Redis layers share: each text is written once and registered once per client."""

from __future__ import annotations

import weakref

import redis
from redis.commands.core import Script

# Deletes a key only while it holds the caller's value (a slot or lock someone else took is kept).
DELETE_IF_EQUAL_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_BOUND: weakref.WeakKeyDictionary[redis.Redis, dict[str, Script]] = weakref.WeakKeyDictionary()


def bound(r: redis.Redis, text: str) -> Script:
    """The script bound to client r, made once per client (callers make their objects per request)."""
    scripts = _BOUND.setdefault(r, {})
    script = scripts.get(text)
    if script is None:
        script = scripts[text] = r.register_script(text)
    return script


def delete_if_equal(r: redis.Redis, key: str, value: str) -> bool:
    """Release a lock or slot this caller holds; False when it is no longer the caller's."""
    return bool(bound(r, DELETE_IF_EQUAL_LUA)(keys=[key], args=[value]))
