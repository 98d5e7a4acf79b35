"""Stipple's test kit: what the tests and benches build their world from, written once.

- `stipple_testkit.network`: the network inside the test process, made of the real
  services (`Network.plain/secured`, nodes joining through the real protocol, `run_task`),
  and `tiny_runner`, the built-in tiny model loaded.
- `stipple_testkit.nodes`: node announcements (`joined`, `publish_joined`).
- `stipple_testkit.chain`: `running_anvil()`, and `IndexedChain`, a deployment with the
  chain-indexer run in-process, on the in-process EVM or anvil.
- `stipple_testkit.tinyzoo`: tiny SDXL, ControlNets, LoRAs, embeddings, VAE, inpainting
  models around the built-in tiny model (`stipple_node.tinymodel`).
- `stipple_testkit.fileserver`: a local HTTP server that misbehaves on request (downloads).
- `stipple_testkit.faults`: the fault tests' batches and outcome checks, a TCP proxy that
  can be cut (a store unreachable for a while) and a webhook receiver, all on loopback.
- `stipple_testkit.standin`: a stand-in for an annotator's network.
- `stipple_testkit.waits`: `until(what, check)`, waiting for what the services do on their own time.
- `ManagedProcess`, `stop_all`, `free_port` (from `stipple_common.process`): child
  processes started, waited for and stopped one way (nats-server, anvil, the services).

Nothing in the services imports this package: it is installed for development only.
The submodules are imported on demand (the network one loads torch).
"""

from stipple_common.process import ManagedProcess, ProcessError, free_port, stop_all

from .nodes import joined, publish_joined

__all__ = ["ManagedProcess", "ProcessError", "free_port", "joined", "publish_joined", "stop_all"]
