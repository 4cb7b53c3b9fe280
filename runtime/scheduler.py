"""Continuous batching: a Scheduler that runs many generations through one Model, joining and leaving per step.

    with dgrun.Scheduler(model, max_batch=8) as scheduler:
        a = scheduler.submit(model.request("def fibonacci(n):", seed=1))
        b = scheduler.submit(model.infill_request("def f(x):", "return y", seed=2))
        for event in a:                 # Draft / Commit events, as Model.stream yields them
            ...
        print(b.result().text)          # or wait for the whole answer

One worker thread owns the Model while the Scheduler is open (its own `generate`/`stream` raise ModelBusyError
meanwhile) and loops: admit queued elements (up to `max_batch` running), drop cancelled ones, then one step for
all running elements — encoder passes where due, one batched decoder pass, one sampler step each
(`dgrun.generate.decode_step`, the loop every generation runs). A submitted element joins at the next step; a
finished, failed or cancelled one leaves before it. Each element's tokens are exactly those it gets alone.
Changes to the model while it runs (LoRA scales: `set_lora_adapters`) are made by the worker between two steps,
so no decoder pass sees half of one.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from dgrun.generate import MAX_BATCH, Commit, Draft, Generation, Request, Stats, _is_int, decode_step

if TYPE_CHECKING:
    from dgrun.engine import GenerationOutput, Model

_END = object()  # the last item of every handle's event queue
T = TypeVar("T")


class Handle:
    """One submitted element: iterate it (once) for its `Draft`/`Commit` events, or wait for `result()`.

    Iteration blocks until the next event and ends when the element finishes or is cancelled; if its generation
    failed, the exception is raised there (and by `result`). Safe to read and cancel from any thread.
    """

    def __init__(self, scheduler: Scheduler, request: Request):
        self.request = request
        self.stats = Stats()
        self.tokens: list[int] = []  # committed so far
        self.cancelled = False
        self.error: Exception | None = None
        self._scheduler = scheduler
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = False
        self.generation: Generation | None = None  # made when the element joins the batch

    @property
    def done(self) -> bool:
        """Finished, failed or cancelled: no more events will come."""
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this element before the next step (a queued one never runs); no-op once done."""
        self._scheduler.cancel(self)

    def __iter__(self) -> Iterator[Draft | Commit]:
        while True:
            item = self._events.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item  # type: ignore[misc]

    def result(self, timeout: float | None = None) -> GenerationOutput:
        """Wait for the element to end; its output (tokens committed before a cancellation, if cancelled).

        Raises the generation's exception if it failed, TimeoutError if `timeout` seconds pass first.
        """
        from dgrun.engine import GenerationOutput

        if not self._done.wait(timeout):
            raise TimeoutError(f"the element did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return GenerationOutput(list(self.tokens), self._scheduler.model.detokenize(self.tokens),
                                self.stats.as_dict())

    # -- worker side -------------------------------------------------------------------------------------

    def _deliver(self, event: Draft | Commit) -> None:
        if isinstance(event, Commit):
            self.tokens.extend(event.tokens)
        self._events.put(event)

    def _end(self, error: Exception | None = None, cancelled: bool = False) -> None:
        self.error, self.cancelled = error, cancelled
        self.generation = None  # its cache and logits can go now
        self._done.set()
        self._events.put(_END)


class Scheduler:
    """Runs submitted generations in one continuously batched loop on a worker thread (see the module notes).

    `max_batch` bounds the elements in one decoder pass; more wait in a FIFO queue (`queued` says how many, so a
    server can refuse work it cannot start soon). `close()` (or leaving the `with` block) cancels what is left,
    stops the worker and hands the Model back.
    """

    def __init__(self, model: Model, max_batch: int = MAX_BATCH):
        from dgrun.engine import ModelBusyError

        if not (_is_int(max_batch) and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not model._lock.acquire(blocking=False):
            raise ModelBusyError("this Model is already generating; a Scheduler needs it to itself")
        self.model, self.max_batch = model, int(max_batch)
        self._wake = threading.Condition()
        self._queued: deque[Handle] = deque()
        self._running: list[Handle] = []
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # for the worker, between steps
        self._closed = False
        self._steps = 0
        self._worker = threading.Thread(target=self._work, name="dgrun-scheduler", daemon=True)
        self._worker.start()

    @property
    def running(self) -> int:
        """Elements in the batch now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Elements waiting for a place in the batch."""
        return len(self._queued)

    @property
    def steps(self) -> int:
        """Denoising steps run so far, one per element per decoder pass: counted as the worker delivers them, so
        once `running` and `queued` read 0 it stands still."""
        return self._steps

    def submit(self, request: Request) -> Handle:
        """Queue a request (from `Model.request`, `infill_request` or `edit_request`); it joins at the next step
        that has room. Returns its handle. RuntimeError once the scheduler is closed."""
        if not isinstance(request, Request):
            raise TypeError("submit takes a dgrun Request (Model.request / infill_request / edit_request)")
        handle = Handle(self, request)
        with self._wake:
            if self._closed:
                raise RuntimeError("this Scheduler is closed")
            self._queued.append(handle)
            self._wake.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop an element before the next step; a queued one is dropped at once. No-op once it is done."""
        with self._wake:
            if handle.done:
                return
            if handle in self._queued:
                self._queued.remove(handle)
                handle._end(cancelled=True)
            else:
                handle._cancel = True
                self._wake.notify()

    def between_steps(self, call: Callable[[], T]) -> T:
        """Run `call()` on the worker between two steps (while no decoder pass is in progress) and return what it
        returns (or raise what it raises); waits at most one step. RuntimeError once the scheduler is closed."""
        if threading.current_thread() is self._worker:
            return call()
        future: Future[T] = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("this Scheduler is closed")
            self._calls.append((call, future))
            self._wake.notify()
        return future.result()

    def set_lora_adapters(self, entries: Sequence[dict[str, Any]]) -> None:
        """`Model.set_lora_adapters` while the scheduler runs: the new scales apply from the next decoder pass on,
        to every element (a running one keeps the encoder cache its prompt got under the old scales)."""
        scales = self.model.lora_scales(entries)  # a bad entry fails here, in the caller's thread
        lora = self.model.lora
        if lora is not None:
            self.between_steps(lambda: lora.set_scales(scales))

    def close(self) -> None:
        """Cancel every queued and running element, wait for the worker to stop, and give the Model back."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker ---------------------------------------------------------------------------------------

    def _admit(self) -> list[Handle] | None:
        """Under the lock: apply cancellations, fill the batch from the queue, wait while there is nothing to do.
        The batch for the next step, or None when closed."""
        with self._wake:
            while True:
                for handle in [h for h in self._running if h._cancel or self._closed]:
                    self._running.remove(handle)
                    handle._end(cancelled=True)
                while self._queued and (self._closed or len(self._running) < self.max_batch):
                    handle = self._queued.popleft()
                    if self._closed:
                        handle._end(cancelled=True)
                        continue
                    handle.generation = Generation(self.model.graph, handle.request, handle.stats)
                    self._running.append(handle)
                if self._running:
                    return list(self._running)
                if self._closed:
                    return None
                if self._calls:
                    return []  # nothing to step: just the calls
                self._wake.wait()

    def _run_calls(self) -> None:
        with self._wake:
            calls = list(self._calls)
            self._calls.clear()
        for call, future in calls:
            try:
                future.set_result(call())
            except Exception as e:  # the caller gets it
                future.set_exception(e)

    def _work(self) -> None:
        try:
            while (batch := self._admit()) is not None:
                self._run_calls()
                if not batch:
                    continue
                try:
                    outcomes = decode_step(self.model.graph, [h.generation for h in batch])
                except Exception as e:  # the shared pass failed: every element in it fails
                    outcomes = [e] * len(batch)
                with self._wake:
                    for handle, outcome in zip(batch, outcomes, strict=True):
                        if isinstance(outcome, Exception):
                            self._running.remove(handle)
                            handle._end(error=outcome)
                            continue
                        for event in outcome:
                            if isinstance(event, Draft):
                                self._steps += 1
                            handle._deliver(event)
                        if handle.generation is not None and handle.generation.finished:
                            self._running.remove(handle)
                            handle._end()
        except BaseException as e:  # a bug in the loop itself: no caller may wait forever
            with self._wake:
                self._closed = True
                error = e if isinstance(e, Exception) else RuntimeError(f"the scheduler stopped: {e!r}")
                for handle in [*self._running, *self._queued]:
                    handle._end(error=error)
                self._running.clear()
                self._queued.clear()
            raise
        finally:
            with self._wake:
                self._closed = True
                calls = list(self._calls)
                self._calls.clear()
            for _, future in calls:
                future.set_exception(RuntimeError("this Scheduler is closed"))
            self.model._lock.release()
