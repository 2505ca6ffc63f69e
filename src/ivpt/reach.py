"""Whether a download server can be reached, asked once in a few seconds.

huggingface_hub retries a failed request five times with growing pauses, so a machine without network
waits about a minute before any error; a DNS lookup and one TCP connection tell the same in seconds.
Nothing here is needed when ``HF_HUB_OFFLINE=1``: huggingface_hub then reads its cache without asking.
"""
from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

TIMEOUT = 5.0  # seconds for the lookup and the connection together, per host
REMEMBER = 60.0  # seconds an answer is reused: a long tune asks again after a network blip
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_ANSWERS: dict[tuple[str, int], tuple[float, str | None]] = {}


def unreachable(url: str) -> str | None:
    """Why the server of ``url`` cannot be reached from here (None: it can, or the question cannot be asked:
    behind a proxy the connection goes elsewhere, so nothing is said)."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return None
    asked, answer = _ANSWERS.get((host, port), (float("-inf"), None))
    if time.monotonic() - asked > REMEMBER:
        answer = _ask(host, port)
        _ANSWERS[(host, port)] = (time.monotonic(), answer)
    return answer


def _ask(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return None
    except socket.gaierror as err:
        return f"{host} cannot be looked up ({err.strerror or err})"
    except OSError as err:
        return f"{host}:{port} does not answer ({err.strerror or err})"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (None: it can, or HF_HUB_OFFLINE=1 says not to ask)."""
    return None if hub_offline() else unreachable(hub_endpoint())
