"""The credentials `pdserve up` hands its router and instances: the deployment secret (one
per deployment, made here unless the user gave one) and the clients' API key.

Both travel in the children's environment, never on a command line, where `ps` shows them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from pdserve.security import API_KEY_ENV, SECRET_ENV, DeploymentSecret, load_secret


@dataclass
class Credentials:
    """What every process of one deployment shares."""

    secret: DeploymentSecret = field(repr=False)
    api_key: str | None = field(default=None, repr=False)
    open_metrics: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Credentials:
        """--secret-file, else $PDSERVE_DEPLOYMENT_SECRET, else a new secret; --api-key,
        else $PDSERVE_API_KEY. Raises SecretError for an unusable secret."""
        # made in the form the children read back from their environment
        secret = (load_secret(args.secret_file)
                  or DeploymentSecret.from_text(DeploymentSecret.generate().to_text()))
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        return cls(secret, api_key, args.open_metrics)

    def env(self) -> dict[str, str]:
        """The variables to add to each child's environment."""
        out = {SECRET_ENV: self.secret.to_text()}
        if self.api_key:
            out[API_KEY_ENV] = self.api_key
        return out

    def flags(self) -> list[str]:
        """Flags for every child's command line (nothing secret)."""
        return ["--open-metrics"] if self.open_metrics else []
