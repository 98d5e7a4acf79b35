"""A document nested far past any real one, from an app or a node, is refused, never the
end of the process: py_ecc (imported by eth_account) raises Python's recursion limit to
100,000, with which msgspec recursed past the C stack (SIGSEGV) on ~50,000 levels."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_recursion_limit_stays_low_after_eth_account_and_deep_documents_are_rejected():
    script = textwrap.dedent(
        """
        import sys
        import threading

        import msgspec

        import stipple_common
        import eth_account  # noqa: F401  (py_ecc: it raised the limit at its import)
        from stipple_common.errors import Rejected
        from stipple_common.messages import decode_task_event

        assert sys.getrecursionlimit() <= 10_000, sys.getrecursionlimit()
        deep = b"[" * 99_000 + b"]" * 99_000
        outcome = []

        def untyped():  # as any JSON body or Any-typed field is read, in a thread (smaller stack)
            try:
                msgspec.json.decode(deep)
            except RecursionError:
                outcome.append("refused")

        thread = threading.Thread(target=untyped)
        thread.start()
        thread.join()
        assert outcome == ["refused"], outcome

        # a submitted task whose scheduler args (typed Any) nest that deep
        task_id = "a" * 32
        spec = b'{"base_model": "m", "prompt": "p", "scheduler": {"method": "DDIMScheduler", "args": {"k": '
        event = b'{"type": "submitted", "task_id": "' + task_id.encode() + b'", "submitted_at": 1, "spec": '
        try:
            decode_task_event(f"tasks.{task_id}.submitted", event + spec + deep + b"}}}")
        except Rejected as exc:
            assert exc.reason == "undecodable", exc.reason
        else:
            raise AssertionError("decoded")
        print("ok")
        """
    )
    # in a child process: were the limit high again, the crash must not take the test run down
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "ok"
