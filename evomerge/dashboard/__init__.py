"""`evomerge dashboard`: one local web server for a study's state, progress, best recipe and actions.

optuna-dashboard is mounted beside evomerge's own pages for its plots; evomerge adds what it
cannot show or do: state and heartbeat, the best against the sources, the recipe, and the
pause / resume / export buttons.
"""

from evomerge.dashboard.app import DashboardApp, DashboardConfig
from evomerge.dashboard.security import TOKEN_ENV, DashboardError
from evomerge.dashboard.server import serve, serve_in_thread

__all__ = ["DashboardApp", "DashboardConfig", "DashboardError", "TOKEN_ENV", "serve", "serve_in_thread"]
