"""The on-disk store of committed, unrevealed results (unrevealed.py)."""

import os
import time

from stipple_common.messages import ImageResult, TaskCommitted
from stipple_node.unrevealed import Unrevealed, UnrevealedStore


def record(task_id: str) -> Unrevealed:
    image = ImageResult(index=0, key=f"tasks/{task_id}/n/0.png", phash="0" * 16, seed=1, width=64, height=64)
    event = TaskCommitted(task_id=task_id, node_id="n", commitment="0x01", signature="0x02")
    return Unrevealed(
        task_id=task_id, images=[image], nonce="0x" + "a" * 64, elapsed_s=1.5, determinism="c", event=event
    )


def test_what_is_saved_is_loaded_back_oldest_first_and_dropped_once_revealed(tmp_path):
    store = UnrevealedStore(tmp_path)
    for task_id in ("aa01", "aa02"):
        store.save(record(task_id))
        time.sleep(0.01)  # distinct modification times: the order is by age
    again = UnrevealedStore(tmp_path)  # as after a restart
    assert again.load() == [record("aa01"), record("aa02")]
    again.drop("aa01")
    assert [r.task_id for r in again.load()] == ["aa02"]
    again.drop("never-saved")  # nothing to drop: no error


def test_it_keeps_at_most_keep_records_and_none_past_max_age(tmp_path):
    store = UnrevealedStore(tmp_path, keep=2)
    for task_id in ("b1", "b2", "b3"):
        store.save(record(task_id))
        time.sleep(0.01)
    assert [r.task_id for r in store.load()] == ["b2", "b3"]  # the oldest went first
    stale = tmp_path / "b2.json"
    os.utime(stale, (time.time() - 90_000, time.time() - 90_000))
    assert [r.task_id for r in store.load()] == ["b3"]


def test_a_task_id_that_is_no_plain_file_name_is_not_kept_and_a_torn_file_is_dropped(tmp_path):
    store = UnrevealedStore(tmp_path / "kept")
    store.save(record("../../etc/passwd"))
    store.save(record(""))
    assert list((tmp_path / "kept").iterdir()) == []
    assert not (tmp_path / "etc").exists()
    (tmp_path / "kept" / "cafe.json").write_bytes(b'{"task_id": "cafe", "im')  # cut off mid-write by a crash
    assert store.load() == []
    assert not (tmp_path / "kept" / "cafe.json").exists()
