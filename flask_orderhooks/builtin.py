"""The platforms the extension knows out of the box."""

from __future__ import annotations

from .gateway import GatewayProvider
from .igv import IGVProvider
from .provider import Provider
from .standard_webhooks import StandardWebhooksProvider
from .sud import SUDProvider

#: The default of ``OrderHooks(providers=...)``: each is on only when its
#: config keys are set. Extend it to add a platform of your own::
#:
#:     OrderHooks(app, providers=[*BUILTIN_PROVIDERS, AcmeProvider])
BUILTIN_PROVIDERS: tuple[type[Provider], ...] = (
    IGVProvider,
    GatewayProvider,
    SUDProvider,
    StandardWebhooksProvider,
)
