"""Group commit: requests that arrive while the writer is busy are written together, in one transaction.

One transaction per request makes the commit (and the write lock it holds) the cost of every request; under
many concurrent posters they queue for the lock one by one. Here a request waits only for the write in progress
to end, and then goes in one call with every other request that waited meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

R = TypeVar("R")
A = TypeVar("A")


class GroupCommit(Generic[R, A]):
    """Feeds `write(requests) -> answers` (one answer per request, in order), at most `writers` calls at once.

    A call takes every request waiting when it starts, in arrival order, as long as their sizes add up to at most
    `max_size` (a request larger than that goes alone). `write` runs on `executor`; a request's answer is set
    only once the call that holds it has returned, so whatever `write` does before returning (commit, then flip
    throttle flags) is done before any of its requests hears back. An exception from `write` is every request's
    of that call. Use from one event loop.
    """

    def __init__(
        self,
        write: Callable[[Sequence[R]], Sequence[A]],
        size: Callable[[R], int],
        max_size: int,
        executor: Executor,
        writers: int = 1,
    ) -> None:
        if max_size < 1 or writers < 1:
            raise ValueError("max_size and writers must be at least 1")
        self._write = write
        self._size = size
        self._max_size = max_size
        self._executor = executor
        self._writers = writers
        self._waiting: deque[tuple[R, asyncio.Future[A]]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._writing = 0

    @property
    def waiting(self) -> int:
        """Requests waiting for a writer."""
        return len(self._waiting)

    @property
    def writing(self) -> int:
        """Requests in the calls in progress."""
        return self._writing

    async def submit(self, request: R) -> A:
        """Its answer, once the call that wrote it (with others, perhaps) has returned."""
        return await self.enqueue(request)

    def enqueue(self, request: R) -> asyncio.Future[A]:
        """Queue a request now (on the loop's thread); the future of its answer."""
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        self._start()
        return future

    def _start(self) -> None:
        while self._waiting and len(self._running) < self._writers:
            group = [self._waiting.popleft()]
            size = self._size(group[0][0])
            while self._waiting and size + self._size(self._waiting[0][0]) <= self._max_size:
                size += self._size(self._waiting[0][0])
                group.append(self._waiting.popleft())
            task = asyncio.get_running_loop().create_task(self._call(group))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start()

    async def _call(self, group: list[tuple[R, asyncio.Future[A]]]) -> None:
        requests = [request for request, _ in group]
        self._writing += len(group)
        try:
            answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._write, requests)
            if len(answers) != len(group):
                raise RuntimeError(f"{len(answers)} answers to a group of {len(group)} requests")
        except Exception as exc:  # each waiter of this call raises it
            self._writing -= len(group)
            for _, future in group:
                if not future.done():  # a waiter that was cancelled (its client left) has no use for it
                    future.set_exception(exc)
            return
        self._writing -= len(group)
        for (_, future), answer in zip(group, answers, strict=True):
            if not future.done():
                future.set_result(answer)
