"""The Ray cluster a sweep runs on: reaching it (or starting a local one), telling an address where
nothing listens from a cluster that refuses our token, what its nodes can run, and Tune's progress
when the driver is a Ray Client.

Apart from the sweep (the grid, the trials, registration), in the bottom layer: everything here is
about the cluster and would be the same for any Ray job (a sweep's trials, a harvest's workers).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import SAERegistryError
from .net import probe

if TYPE_CHECKING:
    from ..config.sweep import Resources

__all__ = ["check_address", "check_resources", "client_progress", "connect", "refused_authentication"]


def connect(address: str | None) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start a local Ray on this machine's CPUs.

    Returns whether this call started Ray (the caller then shuts it down). A cluster that refuses the
    token is told apart from one that cannot be reached: the fixes differ.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        check_address(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            _name_local_auth_mode()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except Exception as e:  # Ray's errors: ConnectionError, RuntimeError, ValueError, AuthenticationError
        if refused_authentication(e):
            given = "RAY_AUTH_TOKEN is set" if os.environ.get("RAY_AUTH_TOKEN") else "no RAY_AUTH_TOKEN is set"
            raise SAERegistryError(
                f"the Ray cluster at {address} answers but refused authentication (RAY_AUTH_MODE is "
                f"{os.environ.get('RAY_AUTH_MODE') or 'unset'}, {given}): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                "to the token the cluster's nodes were started with (or RAY_AUTH_TOKEN_PATH to a file holding it)"
            ) from None
        if address and address.startswith("ray://") and "connection timeout" in str(e):
            # Ray Client reports a refused token only as a timeout; its port did answer (check_address).
            raise SAERegistryError(
                f"the Ray Client server at {address} answers but did not accept this connection (RAY_AUTH_MODE is "
                f"{os.environ.get('RAY_AUTH_MODE') or 'unset'}): if the cluster uses token authentication, set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its token; else check that the port is the head's "
                "Ray Client port (10001)"
            ) from None
        if isinstance(e, (ConnectionError, RuntimeError, ValueError)):
            raise SAERegistryError(f"cannot reach a Ray cluster at {address}: {e}") from e
        raise
    return True


def _name_local_auth_mode() -> None:
    """Token authentication for the local Ray we start, as Ray's default, without its warning.

    With ``RAY_AUTH_MODE`` unset, ``ray.init`` turns token authentication on for a new local
    cluster (setting ``RAY_AUTH_MODE=token`` in this process for its child processes, and reloading
    its config) and warns that it did, at every start. Doing exactly that ourselves first keeps the
    same security and the same end state, without the notice. A mode the user set is left alone;
    Ray reads it from the environment only (``ray.init`` has no option for it).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._raylet import Config  # type: ignore[attr-defined]  # compiled: Ray ships no stub for it

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches the mode it read at import: read it again, as ray.init itself does


def refused_authentication(error: BaseException) -> bool:
    """Whether Ray's connection error comes from the cluster refusing our token (not from the network).

    Ray raises ``ConnectionError("Failed to connect to Ray cluster ...")`` either way; a refused token
    shows as a ``ray.exceptions.AuthenticationError`` down the chain (``InvalidAuthToken``), sometimes
    only as text inside a ``RuntimeError`` (over Ray Client, in the server's reply).
    """
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AuthenticationError) or any(
                word in str(seen) for word in ("InvalidAuthToken", "AuthenticationError", "UNAUTHENTICATED")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def client_progress(verbose: int):
    """Tune's progress table for a driver on Ray Client, or ``None`` when running on the cluster itself.

    Over Ray Client, Tune runs the experiment in an actor on the cluster; its own reporter prints
    there, and the table reaches this process only through a reporter that can use Tune's queue.
    """
    import ray
    from ray.tune import CLIReporter
    from ray.tune.progress_reporter import RemoteReporterMixin

    if not verbose or not ray.util.client.ray.is_connected():
        return None

    class ClientReporter(CLIReporter, RemoteReporterMixin):
        def report(self, trials, done, *sys_info):
            text = self._progress_str(trials, done, *sys_info)
            if self.output_queue is not None:
                self.output_queue.put(text)  # shown by display() in the driver
            else:
                self.display(text)

        def display(self, string: str) -> None:
            print(string, flush=True)

    return ClientReporter()


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse, in seconds, a ``host:port`` (or ``ray://host:port``) where nothing listens.

    ``ray.init`` on such an address retries for minutes (forever, for some forms) instead of failing.
    ``auto``/``local`` and other forms are left to Ray.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        probe(host, int(port), timeout)
    except OSError as e:
        raise SAERegistryError(
            f"no Ray cluster answers at {address} ({e}); start one (`ray start --head`), fix --address / "
            "RAY_ADDRESS, or unset both to run on a local Ray"
        ) from None


def check_resources(resources: Resources) -> None:
    """Refuse trials the cluster can never place (Tune would leave them PENDING forever)."""
    import ray

    per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need_cpu, need_gpu = resources.cpu, resources.gpu
    if not any(r.get("CPU", 0) >= need_cpu and r.get("GPU", 0) >= need_gpu for r in per_node):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in per_node) or "no nodes"
        raise SAERegistryError(
            f"no node of the Ray cluster can run a trial needing {need_cpu:g} CPU and {need_gpu:g} GPU "
            f"(nodes: {have}); lower resources: in the spec or add such a node"
        )
