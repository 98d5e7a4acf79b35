"""Gas per settled task: one task per transaction against N tasks in one `TaskPayment.settle`.

Each task pays 3 nodes by share. The nodes already hold a balance in TaskPayment (the
steady state: a node's first payment ever costs 15,000 gas more for the new storage slot),
and the tasks of one batch have distinct nodes, so no batch gains from storage slots warmed
by an earlier task in it; `same-3-nodes` is the best case, every task paying the same three.
Gas is `gasUsed` of the receipts, the 21,000 of every transaction included, so the ratio is
what an operator pays. Runs on the in-process EVM (eth-tester/py-evm) and, when the anvil
npm package is installed in contracts/node_modules, on anvil too; both must agree.

    python bench/settlement_gas.py [--single 20] [--batches 10,50,100]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Iterator
from contextlib import contextmanager

from eth_utils import keccak, to_checksum_address
from web3 import Web3

from stipple_common import chain as ch
from stipple_common.chain import Settlement, StippleChain

FEE = 3_000


@contextmanager
def backends() -> Iterator[Iterator[tuple[str, Web3]]]:
    anvil = None
    try:
        anvil = ch.Anvil.start()
    except ch.ChainError as exc:
        print(f"anvil: not run ({exc})")

    def each() -> Iterator[tuple[str, Web3]]:
        yield "eth-tester", ch.connect(ch.EMBEDDED_URL)
        if anvil is not None:
            yield "anvil", ch.connect(anvil.url)

    try:
        yield each()
    finally:
        if anvil is not None:
            anvil.stop()


def node_pool(size: int) -> list[str]:
    return [to_checksum_address(keccak(text=f"bench-node-{i}")[-20:]) for i in range(size)]


def measure(w3: Web3, single: int, batches: list[int]) -> dict[str, float]:
    a = w3.eth.accounts
    admin, app = a[0], a[1]
    chain = StippleChain(w3, ch.deploy_all(w3, admin, min_stake=1, cooldown_s=1, treasury=a[9]))
    largest = max(batches)
    pool = node_pool(3 * largest)
    n_tasks = largest + single + sum(batches) + batches[-1]
    chain.mint(admin, app, FEE * n_tasks)
    chain.deposit(app, FEE * n_tasks)

    counter = iter(range(10**9))

    def escrow(n: int) -> list[str]:
        ids = [f"bench-task-{next(counter)}" for _ in range(n)]
        for task_id in ids:
            chain.escrow(admin, task_id, app, FEE)
        return ids

    def settlements(ids: list[str], same: bool = False) -> list[Settlement]:
        return [Settlement(t, pool[0:3] if same else pool[3 * k : 3 * k + 3], [5, 3, 2]) for k, t in enumerate(ids)]

    # Warm-up: every node of the pool gets its balance slot.
    chain.settle(admin, settlements(escrow(largest)))

    out: dict[str, float] = {}
    gas = [chain.settle(admin, settlements([t]))["gasUsed"] for t in escrow(single)]
    out["1 per tx"] = sum(gas) / len(gas)
    for n in batches:
        out[f"{n} per tx"] = chain.settle(admin, settlements(escrow(n)))["gasUsed"] / n
    n = batches[-1]
    out[f"{n} per tx, same-3-nodes"] = chain.settle(admin, settlements(escrow(n), same=True))["gasUsed"] / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=20, help="tasks settled one per transaction")
    parser.add_argument("--batches", default="10,50,100", help="batch sizes, comma-separated")
    args = parser.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    arts = ch.load_artifacts()
    print(
        f"settlement gas, 3 nodes per task; solc {arts['TaskPayment'].compiler['version']}, "
        f"evm {arts['TaskPayment'].compiler['settings']['evmVersion']}; {platform.python_version()}"
    )
    with backends() as each:
        for name, w3 in each:
            figures = measure(w3, args.single, batches)
            base = figures["1 per tx"]
            print(f"\n{name}")
            print(f"  {'case':<28} {'gas/task':>10} {'vs 1 per tx':>12}")
            for case, value in figures.items():
                print(f"  {case:<28} {value:>10,.0f} {value / base:>11.3f}x")


if __name__ == "__main__":
    main()
