"""Reaching the Hugging Face Hub, or knowing at once that we cannot.

huggingface_hub and datasets retry a failed connection for about 25 s (measured here, with no
network: five retries, 1-8 s apart) before they give up, and only then look in the local
cache. A trainer that names a Hub model or dataset therefore probes the endpoint first, for a
few seconds at most, and when it is unreachable switches both libraries to offline mode: a
model or dataset already in the local cache then loads as it would online, and one that is not
fails at once with an error that names it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

# Long enough for a slow DNS answer or a TLS-less TCP handshake to a far endpoint, short enough
# that a machine with no network learns it before anybody waits.
PROBE_SECONDS = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_by_request() -> bool:
    """Whether the user already put huggingface_hub in offline mode."""
    return any(
        os.environ.get(name, "").upper() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def endpoint_reachable(endpoint: str | None = None, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` seconds.

    The probe runs in a thread because name resolution (getaddrinfo) takes no timeout and can
    hang far longer than the connect itself.
    """
    parts = urlsplit(endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def go_offline() -> None:
    """Put huggingface_hub and datasets in offline mode for the rest of this process.

    Both read the environment when first imported; a library imported before this call has
    its module-level switch set as well, so the order of imports does not matter.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def prepare_hub_access() -> bool:
    """Probe the Hub once; go offline when it cannot be reached. Returns whether it is online."""
    if offline_by_request():
        go_offline()
        return False
    if endpoint_reachable():
        return True
    go_offline()
    return False
