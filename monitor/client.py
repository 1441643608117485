"""What a proxy imports: the client now lives in `monitor.http.client`; this keeps `monitor.client` working.

Standard library only, like the module it re-exports, so a proxy can import it without the daemon's database stack.
"""

from __future__ import annotations

from monitor.http.client import (
    AdmissionRefused,
    ClientStats,
    Lease,
    MonitorClient,
    MonitorError,
    Source,
    Verdict,
)

__all__ = ["AdmissionRefused", "ClientStats", "Lease", "MonitorClient", "MonitorError", "Source", "Verdict"]
