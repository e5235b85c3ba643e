"""Human-readable views of a plan: its step x unit map (``diffaccel plan show``)."""
