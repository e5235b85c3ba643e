"""Human-readable views: plan maps, tables and reports."""
