"""Active Directory over LDAP: the headless client the services use for sign-in and principals."""

from app.directory.client import (
    AuthenticatedUser,
    ConnectionReport,
    ConnectionStep,
    DirectoryClient,
    DirectoryPrincipal,
    DirectorySettings,
    DomainInfo,
    PrincipalType,
)
from app.directory.errors import DirectoryError, SignInRefused
from app.directory.ldapfilter import escape_filter_value, sid_from_bytes, sid_to_bytes

__all__ = [
    "AuthenticatedUser", "ConnectionReport", "ConnectionStep", "DirectoryClient", "DirectoryError",
    "DirectoryPrincipal", "DirectorySettings", "DomainInfo", "PrincipalType", "SignInRefused",
    "escape_filter_value", "sid_from_bytes", "sid_to_bytes",
]
