"""What the cluster's tests share: stand-ins for Ray's handles in the loops' tests without Ray."""

from __future__ import annotations


class RemoteMethod:
    """An actor method's stand-in: `.remote(*args)` returns an awaitable of `fn(*args)`, as a
    Ray ObjectRef is awaited."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()
