"""Clouds that hold GPU hosts, behind one Protocol (`base.Provider`), and the registry that builds them."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from gpumanager.config import (
    Config,
    Ec2ProviderConfig,
    RunpodProviderConfig,
    SimulatedProviderConfig,
    SurfProviderConfig,
)
from gpumanager.providers.base import Provider
from gpumanager.providers.static import StaticProvider


def build_providers(config: Config, environ: Mapping[str, str], http: httpx.AsyncClient) -> dict[str, Provider]:
    """One provider per `[[providers]]` entry (and `[cloud_api]`), plus `static` for hosts with a url.

    A provider whose secret is missing fails here, at start, naming the variable.
    """
    providers: dict[str, Provider] = {"static": StaticProvider(config.hosts, environ)}
    for pconf in config.all_providers():
        if isinstance(pconf, SimulatedProviderConfig):
            from gpumanager.providers.simulated import SimulatedProvider

            providers[pconf.name] = SimulatedProvider(pconf)
        elif isinstance(pconf, SurfProviderConfig):
            from gpumanager.providers.surf import SurfProvider

            providers[pconf.name] = SurfProvider(pconf, environ)
        elif isinstance(pconf, Ec2ProviderConfig):
            from gpumanager.providers.ec2 import Ec2Provider

            providers[pconf.name] = Ec2Provider(pconf, environ)
        elif isinstance(pconf, RunpodProviderConfig):
            from gpumanager.providers.runpod import RunpodProvider

            providers[pconf.name] = RunpodProvider(pconf, environ)
    return providers
