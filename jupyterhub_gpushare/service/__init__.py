"""The gpushare hub service: live slice capacity, the fair queue, its API and metrics."""
