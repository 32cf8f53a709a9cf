"""Who may load and unload model versions while the service runs: Triton's model control
modes, with a credential Triton does not have.

The model repository RPCs share the data port with ModelInfer, so without this any peer
that can infer could also unload what serves. `none` (the default, as in Triton) refuses
them; `explicit` allows them to callers presenting the admin token. Reading the index
(RepositoryIndex) stays open in both modes, as in Triton.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import Literal

from pydantic import SecretStr

from shared.errors import AdminUnauthenticated, ModelControlDisabled

logger = logging.getLogger(__name__)

ModelControlMode = Literal["none", "explicit"]

#: The metadata key carrying the admin token, as `Bearer <token>` (what gRPC's access-token
#: call credentials send, and `tritonclient`'s `headers={"authorization": ...}`).
AUTHORIZATION_METADATA_KEY = "authorization"


class ModelControl:
    """Decides whether a RepositoryModelLoad/Unload call may change what serves."""

    def __init__(self, mode: ModelControlMode = "none", admin_token: SecretStr | None = None) -> None:
        # Stripped like the presented token: a secret made with `--from-file` ends in "\n".
        token = admin_token.get_secret_value().strip() if admin_token is not None else ""
        if mode == "explicit" and not token:
            raise ValueError("model control mode explicit needs an admin token")
        self.mode = mode
        self._token_digest = hashlib.sha256(token.encode()).digest()

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> None:
        """Returns if the call may proceed; raises ModelControlDisabled or AdminUnauthenticated."""
        if self.mode == "none":
            raise ModelControlDisabled(
                f"{method} is disabled: this server's model control mode is 'none', so versions change "
                "only at start or by repository polling (INFERMESH_INFERENCE_MODEL_CONTROL_MODE=explicit "
                "with an admin token enables it)"
            )
        presented = _bearer(metadata)
        if presented is None:
            raise AdminUnauthenticated(f"{method} needs the admin token as 'authorization: Bearer <token>' metadata")
        # Constant time, over digests of equal length: neither how much of a guess matched
        # nor the token's length shows in the reply's timing.
        if not hmac.compare_digest(hashlib.sha256(presented).digest(), self._token_digest):
            logger.warning("%s refused: wrong admin token from %s", method, peer)
            raise AdminUnauthenticated(f"{method} refused: the admin token is not valid")
        logger.info("%s allowed for %s", method, peer)


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> bytes | None:
    for key, value in metadata:
        if key != AUTHORIZATION_METADATA_KEY:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
    return None
