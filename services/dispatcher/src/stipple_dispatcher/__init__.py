"""Stipple dispatcher: picks the nodes for each task and hands them their work.

Pure logic, thin I/O:

- queue.py decides: the tasks this dispatcher holds (`TaskQueue`, one record per task) and
  every decision about them (assign, wait, abort, replace, cancel, pre-fetch, queue status),
  returned as plain records; no I/O, no asyncio.
- selection.py picks: the node directory as columns (`NodeIndex`), liveness
  (`NodeIndex.live`), eligibility and weights.
- service.py does the I/O: it decodes messages, asks the queue under a lock, and
  publishes what the queue decided; it also folds the NODES stream and the `stakes`
  bucket into the index.
- metrics.py declares the metrics (`DispatcherMetrics`); settings.py the settings.
"""
