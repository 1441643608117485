"""claude-monitor: prices Claude API usage exactly, holds it against budgets, and tells proxies who must stop."""

__version__ = "0.1.0"
