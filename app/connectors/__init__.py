"""Connector types: each is one module with a :class:`~app.connectors.base.Connector` subclass, named in
:data:`REGISTRY` (adding a type is that module plus one line here).

Modules are imported when first used, so a type whose library is missing (libvirt-python) does not keep
the others from working; using it then says what to install.
"""

from __future__ import annotations

import importlib

from app.connectors.base import Connector
from app.errors import EnvironmentProblem, ValidationError

#: Connector type → ``module:class`` of its implementation.
REGISTRY: dict[str, str] = {
    "folder": "app.connectors.folder:FolderConnector",
    "libvirt": "app.connectors.libvirt:LibvirtConnector",
    "pvs": "app.connectors.pvs:PvsConnector",
    "nutanix": "app.connectors.nutanix:NutanixConnector",
    "azure": "app.connectors.azure:AzureConnector",
    "hyperv": "app.connectors.hyperv:HyperVConnector",
    "xenserver": "app.connectors.xenserver:XenServerConnector",
    "vsphere": "app.connectors.vsphere:VSphereConnector",
    "mcs-vsphere": "app.connectors.vsphere:MCSVSphereConnector",
}

#: What to install when a type's module cannot be imported (by the missing module's name).
_INSTALL_HINTS = {"libvirt": "libvirt-python (pip install libvirt-python; on Debian it needs libvirt-dev)",
                  "winrm": "pywinrm (pip install pywinrm)",
                  "pyVim": "pyvmomi (pip install pyvmomi)", "pyVmomi": "pyvmomi (pip install pyvmomi)"}


def implemented(connector_type: str) -> bool:
    """Whether LayerDesk can test and deliver to connectors of this type yet."""
    return connector_type in REGISTRY


def connector_for(connector_type: str) -> Connector:
    """The implementation of ``connector_type``.

    :class:`ValidationError` for a type that has none yet; :class:`EnvironmentProblem` naming what to
    install when its library is missing."""
    spec = REGISTRY.get(connector_type)
    if spec is None:
        raise ValidationError(f"Connectors of type {connector_type!r} cannot test or publish yet; the types that "
                              f"can are {', '.join(sorted(REGISTRY))}.")
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = _INSTALL_HINTS.get((exc.name or "").split(".")[0])
        if hint is None:
            raise
        raise EnvironmentProblem(f"The {connector_type} connector needs {hint}.") from None
    connector = getattr(module, class_name)()
    assert isinstance(connector, Connector)
    return connector
