"""The sampling loop: the request record and the schedule grammar, the per-step plan, the one sampling step,
the host and device loops, and where `dp:K` schedules come from (the statistical DP)."""
